"""Experiment: does Macenko stain normalisation (torchstain) help the JPEG-robust model?

Issue 10 asks to try it and keep it only if validation says so. Equal budget from the same
start: fine-tune a model for E epochs (a) on the patches as they are and (b) on patches whose
stain is normalised per patient (one Macenko stain matrix per patient, fitted on a mosaic of its
patches, mapped onto a reference fitted on training patches of many patients). Validation is the
model's recorded validation patients, JPEG q80 first and normalised after, as a slide read would
be. Prints the patient-weighted validation metrics of both.

    python benchmarks/stain_normalisation.py DATA --init MODEL.pt [--epochs 2] [--samples 28672]

Needs `pip install torchstain` (not a dependency of the app unless adopted).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from inference import metrics as M
from inference.model import load_checkpoint
from training.augment import jpeg_batch
from training.data import PatchSet, evaluation_weights, load_folder
from training.loop import DoneReport, TrainConfig, fit, predict_patches
from training.session import split, split_of


def macenko_per_patient(data: PatchSet, reference: np.ndarray) -> PatchSet:
    """Each patient's patches normalised with one stain matrix fitted on all of them."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    norm = NumpyMacenkoNormalizer()
    norm.fit(reference)
    out = data.images.copy()
    groups = data.groups.astype(str)
    failed = 0
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        side = int(np.ceil(np.sqrt(len(idx))))
        mosaic = np.full((side * 50, side * 50, 3), 255, np.uint8)
        for k, i in enumerate(idx):
            r, c = divmod(k, side)
            mosaic[r * 50 : (r + 1) * 50, c * 50 : (c + 1) * 50] = data.images[i]
        try:
            normed, _, _ = norm.normalize(I=mosaic, stains=False)
        except Exception:  # too little stained tissue to fit a matrix: leave the patient as it is
            failed += 1
            continue
        normed = np.asarray(normed, np.uint8)
        for k, i in enumerate(idx):
            r, c = divmod(k, side)
            out[i] = normed[r * 50 : (r + 1) * 50, c * 50 : (c + 1) * 50]
    print(f"normalised {len(np.unique(groups)) - failed} patients ({failed} left as they were)", file=sys.stderr)
    return replace(data, images=out)


def reference_mosaic(train: PatchSet, n: int = 1024, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pick = train.images[rng.choice(len(train), n, replace=False)]
    side = int(np.sqrt(n))
    return pick[: side * side].reshape(side, side, 50, 50, 3).transpose(0, 2, 1, 3, 4).reshape(side * 50, side * 50, 3)


def run(config: TrainConfig, train: PatchSet, val: PatchSet) -> dict[str, float]:
    done = None
    for report in fit(config, train, val):
        if isinstance(report, DoneReport):
            done = report
    assert done is not None
    model = load_checkpoint(done.checkpoint)
    p = predict_patches(model.net, model.meta, val.images, torch.device("cpu"))
    w = evaluation_weights(val.groups)
    t = M.best_threshold(val.labels, p, w)
    m = M.compute(val.labels, p, t, w)
    return {"balanced_accuracy": m.balanced_accuracy, "auc": m.auc, "f1": m.f1, "threshold": t}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--init", required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=28672)
    ap.add_argument("--lr", type=float, default=5e-4)
    a = ap.parse_args()
    data = load_folder(a.data, exclude_patients=["8975"])
    train, val, _ = split(data, 0.15, 0.15, 0, split_of(a.init))
    val_jpeg = replace(val, images=jpeg_batch(val.images, 80, 0))
    ref = reference_mosaic(train)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(out=str(Path(tmp) / "a.pt"), init=a.init, epochs=a.epochs, samples_per_epoch=a.samples,
                           lr=a.lr, patience=a.epochs, val_jpeg_quality=None)
        results["as is"] = run(base, train, val_jpeg)
        results["Macenko per patient"] = run(replace(base, out=str(Path(tmp) / "b.pt")),
                                             macenko_per_patient(train, ref), macenko_per_patient(val_jpeg, ref))
    print("| training input | val bal. acc. | val AUC | val F1 |")
    print("| --- | --- | --- | --- |")
    for name, m in results.items():
        print(f"| {name} | {m['balanced_accuracy']:.3f} | {m['auc']:.3f} | {m['f1']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
