"""Out-of-domain warnings: resolution far from the model's, tissue unlike the training data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.domain import distance, fit_domain, patch_stats, warnings
from inference.model import ModelMeta, load_checkpoint
from resources import shipped_model_path
from tests.conftest import CMU_SVS, DEMO
from viewer.cli import main


def test_fit_domain_limit_separates_a_shifted_population() -> None:
    rng = np.random.default_rng(0)
    patients = rng.normal(0, 1, (60, 1, 9)) + rng.normal(0, 0.1, (60, 50, 9))  # 60 patients, 50 patches each
    domain = fit_domain(patients.reshape(-1, 9), np.repeat(np.arange(60), 50).astype(str))
    assert domain["patients"] == 60 and len(domain["mean"]) == 9
    assert distance(np.zeros(9), domain) < domain["score_limit"] < distance(np.full(9, 4.0), domain)


def test_patch_stats_are_optical_density_and_stain() -> None:
    white = np.full((2, 50, 50, 3), 255, np.uint8)
    assert np.allclose(patch_stats(white), 0, atol=1e-6)  # no stain in white light
    pink = np.tile(np.array([230, 150, 200], np.uint8), (1, 50, 50, 1))
    s = patch_stats(pink)[0]
    assert s[1] > s[2] > s[0] > 0 and s[4] > 0  # green absorbed most; eosin present


def test_resolution_warning_only_when_coarser_than_the_model() -> None:
    meta = ModelMeta(mpp=4.0)
    assert warnings(0.25, meta, None) == [] and warnings(4.0, meta, None) == []
    (text,) = warnings(8.0, meta, None)
    assert "8.00 \u00b5m/px" in text and text.endswith(".")


@pytest.fixture(scope="module")
def domain_model() -> Path:
    """The shipped model: `calibrate` stored the colour statistics of its 156 training patients
    (73,026-patch set, which CI does not have)."""
    path = shipped_model_path()
    assert load_checkpoint(path).meta.domain["patients"] == 156
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
