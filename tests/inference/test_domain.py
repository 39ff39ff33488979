"""Out-of-domain warnings: resolution far from the model's, tissue unlike the training data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inference.domain import feature_scores, fit_domain, model_features, warnings
from inference.model import ModelMeta, load_checkpoint
from resources import shipped_model_path
from tests.conftest import CMU_SVS, DEMO, need_patches
from training.augment import jpeg_batch
from training.data import load_folder
from viewer.cli import main


def test_fit_domain_limit_separates_a_shifted_population() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(0, 1, (4000, 32)).astype(np.float32)
    groups = np.repeat(np.arange(40), 100).astype(str)
    domain = fit_domain(feats, groups)
    inside = feature_scores(rng.normal(0, 1, (200, 32)), domain)
    outside = feature_scores(rng.normal(1.5, 2, (200, 32)), domain)
    assert np.median(inside) <= domain["score_limit"] < np.median(outside)
    assert domain["patients"] == 40 and len(domain["feature_mean"]) == 32


def test_resolution_warning_only_when_coarser_than_the_model() -> None:
    meta = ModelMeta(mpp=4.0)
    assert warnings(0.25, meta, None) == [] and warnings(4.0, meta, None) == []
    (text,) = warnings(8.0, meta, None)
    assert "8.00 \u00b5m/px" in text and text.endswith(".")


@pytest.fixture(scope="module")
def domain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model with domain statistics of its real training patients (20 patches each)."""
    from inference.model import save_checkpoint

    model = load_checkpoint(shipped_model_path())
    held = {str(p) for p in model.meta.provenance["val_patients"] + model.meta.provenance["test_patients"]}
    data = load_folder(need_patches(), ("8975",), 20, 0)
    train = data.subset(~np.isin(data.groups.astype(str), list(held)))
    domain = fit_domain(model_features(model, jpeg_batch(train.images, 80)), train.groups.astype(str))
    path = tmp_path_factory.mktemp("domain") / "with_domain.pt"
    save_checkpoint(path, model.net, replace(model.meta, domain=domain))
    return path


def test_skin_slide_is_flagged_and_the_breast_demo_is_not(domain_model: Path, tmp_path: Path, capsys) -> None:
    from inference.geometry import Rect
    from inference.slide import open_slide
    from inference.tiff_writer import write_pyramid_from_array

    breast = tmp_path / "breast.tif"  # a quarter of the unseen demo patient's slide
    with open_slide(DEMO) as s:
        write_pyramid_from_array(breast, s.read(Rect(1000, 700, 1600, 1200), (1600, 1200)), 4.0, downsamples=(1, 4))
    assert main(["predict", str(CMU_SVS), str(breast), "--out", str(tmp_path / "out"),
                 "--model", str(domain_model)]) == 0
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and CMU_SVS.name in warned[0] and "unlike the breast H&E" in warned[0], err


def test_panel_says_when_the_slide_is_out_of_domain(qtbot, domain_model: Path, tmp_path: Path, monkeypatch) -> None:
    from tests.viewer.conftest import show_window

    monkeypatch.setenv("IDC_VIEWER_CACHE", str(tmp_path / "cache"))
    w = show_window(qtbot, tmp_path, 1000, 700, model=load_checkpoint(domain_model), device="cpu")
    assert w.open_path(CMU_SVS)
    assert w.inference.domain_label.text() == ""  # nothing known before the model has looked
    with qtbot.waitSignal(w.inference.heatmap_finished, timeout=60_000):
        w.inference.start()
    assert "unlike the breast H&E" in w.inference.domain_label.text()
    assert w.open_path(DEMO)
    assert w.inference.domain_label.text() == ""
    w.close()
