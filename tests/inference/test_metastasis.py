"""The metastasis (PatchCamelyon) model: dense inference as PCam means it, its own class name and
domain, and the two models side by side on one slide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference import predict as predict_module
from inference.domain import warnings as domain_warnings
from inference.model import (
    SCAN_FAMILY,
    Architecture,
    LoadedModel,
    ModelMeta,
    build,
    inference_copy,
    load_checkpoint,
    save_checkpoint,
)
from inference.predict import PredictSettings, plan, predict_slide, read_patches
from inference.session import cached_heatmap, infer
from inference.slide import open_slide
from inference.tiff_writer import write_pyramid_from_array
from resources import model_path, shipped_model_path
from tests.conftest import DEMO, SHARED_DATA
from training.data import DataError
from training.labelled import find_labelled_images, load_labelled, read_label_csv
from training.loop import predict_patches
from viewer.cli import main

PCAM = SHARED_DATA / "pcam_sample"


@pytest.fixture(scope="module")
def metastasis() -> LoadedModel:
    return load_checkpoint(model_path("metastasis"))


@pytest.fixture(scope="module")
def sample(metastasis: LoadedModel):  # noqa: ANN201
    if not (PCAM / "labels.csv").exists():
        pytest.skip("the PCam sample of ../shared/data is not here")
    from inference.tasks import METASTASIS

    return load_labelled(PCAM, METASTASIS)


def pcam_mosaic(images: np.ndarray, cols: int) -> np.ndarray:
    """96 px patches placed edge to edge, row by row, from the slide's origin."""
    rows = len(images) // cols
    return images[: rows * cols].reshape(rows, cols, 96, 96, 3).transpose(0, 2, 1, 3, 4).reshape(rows * 96, cols * 96, 3)


def test_each_patch_centre_cell_is_the_patch_level_prediction(tmp_path: Path, metastasis: LoadedModel, sample) -> None:
    meta = metastasis.meta
    assert (meta.task, meta.positive_class, meta.patch_size, meta.margin, meta.mpp) == \
        ("metastasis", "Metastasis", 32, 32, 0.972)
    pick = np.r_[np.nonzero(sample.labels == 1)[0][:24], np.nonzero(sample.labels == 0)[0][:24]]
    images = sample.images[np.random.default_rng(0).permutation(pick)]
    path = write_pyramid_from_array(tmp_path / "node.tif", pcam_mosaic(images, 8), meta.mpp, downsamples=(1, 4),
                                    compression="zlib")
    with open_slide(path) as slide:
        hm = plan(slide, metastasis, PredictSettings(batch_size=32))
        assert hm.grid.patch_l0 == 32 and hm.grid.patch_shape == (18, 24)
        for _ in predict_slide(slide, metastasis, hm):
            pass
        # The network's input for a patch's centre cell is that patch, read back from the slide.
        idx = np.arange(len(images))
        views = read_patches(slide, hm.grid, 3 * (idx // 8) + 1, 3 * (idx % 8) + 1, meta.margin)
    np.testing.assert_array_equal(views, images)
    expected = predict_patches(metastasis.net, meta, images, torch.device("cpu"))
    centres = np.array([hm.patch_prob[3 * (i // 8) + 1, 3 * (i % 8) + 1] for i in range(len(images))])
    done = np.isfinite(centres)
    assert done.mean() > 0.8  # pale real patches may fall below the tissue mask
    np.testing.assert_allclose(centres[done], expected[done], atol=1e-5)
    for i in range(len(images)):
        rect = hm.grid.patch_rect(3 * (i // 8) + 1, 3 * (i % 8) + 1)
        assert (rect.x, rect.y, rect.w, rect.h) == (96 * (i % 8) + 32, 96 * (i // 8) + 32, 32, 32)


def test_predict_by_name_writes_metastasis_regions(tmp_path: Path, metastasis: LoadedModel, sample) -> None:
    images = sample.images[np.argsort(-sample.labels, kind="stable")[:16]]  # positives
    slide = write_pyramid_from_array(tmp_path / "node.tif", pcam_mosaic(images, 4), 0.972, downsamples=(1, 4))
    assert main(["predict", str(slide), "--model", "metastasis", "--out", str(tmp_path / "out")]) == 0
    regions = json.loads((tmp_path / "out" / "node.metastasis.geojson").read_text())["features"]
    assert regions and {f["properties"]["classification"]["name"] for f in regions} == {"Metastasis"}
    assert regions[0]["properties"]["name"].startswith("Metastasis region")
    with open(tmp_path / "out" / "node.patches.csv") as fh:
        assert "prob_metastasis" in next(csv.reader(fh))
    with open(tmp_path / "out" / "cohort.csv") as fh:
        assert next(csv.DictReader(fh))["positive_class"] == "Metastasis"


def test_both_models_keep_separate_caches_and_their_own_domain(tmp_path: Path, metastasis: LoadedModel, sample) -> None:
    idc = load_checkpoint(shipped_model_path("idc"))
    path = write_pyramid_from_array(tmp_path / "node.tif", pcam_mosaic(sample.images[:64], 8), 0.972,
                                    downsamples=(1, 4))
    with open_slide(path) as slide:
        maps = {}
        for model in (metastasis, idc):
            for report in infer(slide, model, "cpu", PredictSettings()):
                maps[model.meta.task] = getattr(report, "heatmap", None)
        assert maps["metastasis"].info.key() != maps["idc"].info.key()
        for model in (metastasis, idc):
            again = cached_heatmap(slide, model, PredictSettings())
            assert again is not None and again.complete and again.info.positive == model.meta.positive_class
        # The IDC model on lymph node says so; the metastasis model does not.
        idc_score = maps["idc"].domain_score(idc.meta.domain)
        assert domain_warnings(slide.mpp, idc.meta, idc_score)
        assert not domain_warnings(slide.mpp, metastasis.meta, maps["metastasis"].domain_score(metastasis.meta.domain))
    # The metastasis model on the breast demo slide: read at 4 um/px, far coarser than its 0.972.
    with open_slide(DEMO) as slide:
        assert any("coarser" in t for t in domain_warnings(slide.mpp, metastasis.meta, None))


def test_both_layouts_load_and_a_bad_label_csv_gets_one_sentence(tmp_path: Path, sample) -> None:
    rows = list(csv.reader(open(PCAM / "labels.csv")))[1:7]
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    (kaggle / "labels.csv").write_text("id,label\n" + "".join(f"{i},{lb}\n" for i, lb in rows))
    for i, _ in rows:
        (kaggle / f"{i}.tif").write_bytes((PCAM / f"{i}.tif").read_bytes())
    folders = tmp_path / "folders"
    for i, lb in rows:
        (folders / "slide_a" / lb).mkdir(parents=True, exist_ok=True)
        (folders / "slide_a" / lb / f"{i}.tif").write_bytes((PCAM / f"{i}.tif").read_bytes())
    a, b = find_labelled_images(kaggle), find_labelled_images(folders)
    assert sorted((p.name, lb) for p, _g, lb in a) == sorted((p.name, lb) for p, _g, lb in b)
    assert {g for _p, g, _lb in b} == {"slide_a"} and len({g for _p, g, _lb in a}) == 6
    bad = tmp_path / "bad.csv"
    for text, match in (("id,label\nabc,2\n", "line 2: the label must be 0 or 1"),
                        ("name,class\nabc,1\n", "needs a header with id and label"), ("", "is empty")):
        bad.write_text(text)
        with pytest.raises(DataError, match=match) as err:
            read_label_csv(bad)
        assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_evaluate_prints_one_json_line(capsys: pytest.CaptureFixture[str], sample) -> None:
    assert main(["evaluate", str(PCAM), "--model", "metastasis", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == len(sample) == 600
    assert {"auc", "accuracy", "balanced_accuracy", "f1"} <= set(out)
    assert out["auc"] > 0.9  # most of the sample was in the training data: a check of the path, not of the model


def test_unknown_model_name_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(DEMO), "--model", "lymphoma", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No model called 'lymphoma'" in err and "idc, metastasis" in err


def test_a_scan_network_scores_every_cell_as_its_own_patch_each_block_seen_once(
        tmp_path: Path, sample, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan path (a region at once) against the same network on each cell's 96 px patch, on
    a slide whose tissue ends mid-block and whose width is no multiple of the grid."""
    torch.manual_seed(0)
    arch = Architecture(family=SCAN_FAMILY, block=32, side=3)
    net = build(arch)
    for m in net.modules():  # batch-norm statistics of real patches, so that cells differ
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.from_numpy(sample.images[:128]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    net.eval()
    meta = ModelMeta(arch=arch, patch_size=32, mpp=0.972, margin=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                     task="metastasis", classes=("Normal", "Metastasis"))
    save_checkpoint(tmp_path / "scan.pt", net, meta)
    model = load_checkpoint(tmp_path / "scan.pt")
    tissue = pcam_mosaic(sample.images[:42], 7)[:, : 7 * 96 - 40]  # 576 x 632 px: 18 x 20 cells, the last partial
    tissue[:200, :300] = 255  # a blank corner: blocks with some tissue cells only
    path = write_pyramid_from_array(tmp_path / "node.tif", tissue, 0.972, downsamples=(1, 4), compression="zlib")
    seen = []

    def counted(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        fast = inference_copy(net, device)  # what predict runs: the trunk's batch norms folded
        fast.trunk.register_forward_hook(lambda _m, args, _out: seen.append(len(args[0])))
        return fast

    monkeypatch.setattr(predict_module, "inference_copy", counted)
    with open_slide(path) as slide:
        hm = plan(slide, model, PredictSettings())
        assert hm.grid.patch_shape == (18, 20) and 0 < hm.tissue.mean() < 1
        for _ in predict_slide(slide, model, hm, settings=PredictSettings(readers=1)):
            pass
        rows, cols = np.nonzero(hm.tissue)
        patches = read_patches(slide, hm.grid, rows, cols, meta.margin)
    scanned_blocks = sum(seen)
    # The loaded network kept its batch norms (the training tab fine-tunes it); predict folded a copy's.
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.net.modules()) > 20
    expected = predict_patches(model.net, meta, patches, torch.device("cpu"))
    np.testing.assert_allclose(hm.patch_prob[rows, cols], expected, atol=1e-5)
    assert np.ptp(expected) > 0.01
    # Per patch, the trunk would see 9 blocks a cell; scanning, each block about once.
    assert scanned_blocks < 2 * len(rows)


def test_a_scan_network_for_cells_it_cannot_tile_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The IDC task's cell is 50 px with no margin: no whole number of 16 px steps.
    assert main(["train", str(PCAM), "--task", "idc", "--arch", "scan-lite0", "--out", str(tmp_path / "m.pt")]) == 2
    assert "A scan network needs a cell of a multiple of 16 px" in capsys.readouterr().err
