"""The correct-and-retrain loop (issue 6): fine-tune on ~500 patches of drawn regions, re-run the heatmap.

On the bundled demo slide with the shipped model: the "pathologist" marks 500 labelled patches
at random places (the data set's own labels for patient 8975, drawn as 50x50-px IDC / Non-IDC
squares), the whole network is fine-tuned on them with the training tab's defaults, and the
whole slide's heatmap is recomputed. Prints the loop's wall time (target
<= 60 s on a 2-core CPU) against the time of one heatmap computation in the same process, and
the agreement with the labels not used for training, before and after.
Run: python -m benchmarks.correct_retrain
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import shapely

from inference.annotations import Annotation
from inference.model import load_checkpoint
from inference.predict import PredictSettings, plan, predict_slide
from inference.slide import open_slide
from inference.truth import agreement, cell_truth, labels_path, load_labels, truth_from_labels
from resources import demo_slide_path, shipped_model_path
from training.loop import FINE_TUNE
from training.session import RegionSource, SessionConfig, run


def heatmap(slide, model):  # noqa: ANN001, ANN201
    hm = plan(slide, model, PredictSettings())
    for _ in predict_slide(slide, model, hm):
        pass
    return hm


def main() -> int:
    tmp = Path(tempfile.mkdtemp())
    slide_path = tmp / demo_slide_path().name
    shutil.copy(demo_slide_path(), slide_path)
    shutil.copy(labels_path(demo_slide_path()), labels_path(slide_path))
    labels = load_labels(labels_path(slide_path))
    model = load_checkpoint(shipped_model_path())
    with open_slide(slide_path) as slide:
        t0 = time.perf_counter()
        before = heatmap(slide, model)
        t_heatmap = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        chosen = [labels[i] for i in sorted(rng.choice(len(labels), 500, replace=False))]
        anns = tuple(Annotation(shapely.box(lab.rect.x, lab.rect.y, lab.rect.right, lab.rect.bottom),
                                "IDC" if lab.label else "Non-IDC") for lab in chosen)
        held_out = [lab for lab in labels if lab not in set(chosen)]
        held_cells, _ = cell_truth(before.grid, truth_from_labels(held_out))
        m_before = agreement(before, held_cells).metrics

        t1 = time.perf_counter()
        config = SessionConfig(
            (RegionSource(str(slide_path), anns, group_by="region"),),
            replace(FINE_TUNE, out=str(tmp / "ft.pt"), init=str(shipped_model_path())),
            val_fraction=0.2,
        )
        for _report in run(config):
            pass
        t_train = time.perf_counter() - t1
        tuned = load_checkpoint(tmp / "ft.pt")
        t2 = time.perf_counter()
        after = heatmap(slide, tuned)
        t_rerun = time.perf_counter() - t2
    total = time.perf_counter() - t1
    m_after = agreement(after, held_cells).metrics
    print(f"demo slide, {len(anns)} corrected patches ({sum(a.cls == 'IDC' for a in anns)} IDC), "
          f"{len(held_out)} labelled patches held out")
    print(f"baseline: one whole-slide heatmap {t_heatmap:.1f} s")
    print(f"loop: fine-tune {t_train:.1f} s + heatmap again {t_rerun:.1f} s = {total:.1f} s "
          f"({total / t_heatmap:.1f}x one heatmap; target <= 60 s)")
    print(f"held-out agreement before: AUC {m_before.auc:.3f}, bal.acc {m_before.balanced_accuracy:.3f}; "
          f"after: AUC {m_after.auc:.3f}, bal.acc {m_after.balanced_accuracy:.3f}")
    shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
