"""Whole-slide inference: alignment against known real patches, tissue, outputs, cache."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference.heatmap import Heatmap
from inference.model import LoadedModel, load_checkpoint
from inference.patches import GridError, PatchGrid
from inference.predict import PredictSettings, plan, predict_slide
from inference.slide import open_slide
from inference.tiff_writer import write_pyramid_from_array
from resources import shipped_model_path
from tests.conftest import CMU_SVS, DEMO, need_patches
from training.data import load_patch
from training.loop import predict_patches
from viewer.cli import main


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_checkpoint(shipped_model_path())


@pytest.fixture(scope="module")
def real_patches() -> list[np.ndarray]:
    """30 real 50x50 patches of several patients, both classes."""
    root = need_patches()
    with open(root / "manifest.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["width"] == "50" and r["height"] == "50"]
    rng = np.random.default_rng(0)
    pick = [rows[i] for i in rng.choice(len(rows), 30, replace=False)]
    return [load_patch(root / r["path"]) for r in pick]


def mosaic(patches: list[np.ndarray], shape: tuple[int, int], up: float, seed: int = 0):
    """A level-0 image whose grid cells are the given patches (upsampled ``up`` x) or blank.

    Integer factors repeat pixels (exact); others resize bicubically to round(50 * up) px.
    """
    rows, cols = shape
    side = round(50 * up)
    rng = np.random.default_rng(seed)
    cells = rng.choice(rows * cols, len(patches), replace=False)
    img = np.full((rows * side, cols * side, 3), 255, np.uint8)
    placed = {}
    for patch, cell in zip(patches, cells, strict=True):
        r, c = divmod(int(cell), cols)
        if float(up).is_integer():
            big = np.repeat(np.repeat(patch, int(up), axis=0), int(up), axis=1)
        else:
            big = np.asarray(Image.fromarray(patch).resize((side, side), Image.Resampling.BICUBIC))
        img[r * side : (r + 1) * side, c * side : (c + 1) * side] = big
        placed[(r, c)] = patch
    return img, placed


def model_views(patches: list[np.ndarray], shape: tuple[int, int], seed: int, margin: int) -> np.ndarray:
    """What the model sees of each cell ``mosaic(patches, shape, up, seed)`` placed, in its order:
    the original patch with ``margin`` px of the original-resolution mosaic around it (white
    beyond the slide)."""
    small, placed = mosaic(patches, shape, up=1, seed=seed)
    m = margin
    small = np.pad(small, ((m, m), (m, m), (0, 0)), constant_values=255)
    return np.stack([small[r * 50 : r * 50 + 50 + 2 * m, c * 50 : c * 50 + 50 + 2 * m] for r, c in placed])


def test_heatmap_cells_match_the_model_on_the_original_patches(tmp_path: Path, model: LoadedModel, real_patches) -> None:
    img, placed = mosaic(real_patches, (7, 9), up=4)
    path = tmp_path / "mosaic.tif"
    write_pyramid_from_array(path, img, model.meta.mpp / 4, downsamples=(1, 4, 16), compression="zlib")
    expected = predict_patches(model.net, model.meta, model_views(real_patches, (7, 9), 0, model.meta.margin),
                               torch.device("cpu"))
    with open_slide(path) as slide:
        hm = plan(slide, model, PredictSettings(batch_size=16, first_batch=4))
        assert hm.grid.patch_l0 == 200 and hm.grid.patch_shape == (7, 9)
        for _ in predict_slide(slide, model, hm):
            pass
    got = np.array([hm.patch_prob[rc] for rc in placed])
    computed = np.isfinite(got)
    np.testing.assert_allclose(got[computed], expected[computed], atol=2e-3)
    # Blank background cells are never computed.
    blank = np.ones(hm.grid.patch_shape, bool)
    for rc in placed:
        blank[rc] = False
    assert not hm.patch_done[blank].any()
    assert hm.patch_done[tuple(np.array(list(placed)).T)].mean() > 0.9  # pale real patches may be skipped
    # Each computed cell is exactly the level-0 rectangle of its patch.
    for (r, c) in placed:
        rect = hm.grid.patch_rect(r, c)
        assert (rect.x, rect.y, rect.w, rect.h) == (c * 200, r * 200, 200, 200)


def test_jpeg_and_non_integer_mpp_ratio(tmp_path: Path, model: LoadedModel, real_patches) -> None:
    img, placed = mosaic(real_patches[:16], (4, 5), up=2.5, seed=1)
    # Level 0 is 2.5x the model's resolution (a non-integer ratio), stored as JPEG.
    path = tmp_path / "jpeg.tif"
    write_pyramid_from_array(path, img, model.meta.mpp / 2.5, downsamples=(1, 3), compression="jpeg", quality=95)
    expected = predict_patches(model.net, model.meta, model_views(real_patches[:16], (4, 5), 1, model.meta.margin),
                               torch.device("cpu"))
    with open_slide(path) as slide:
        hm = plan(slide, model, PredictSettings())
        assert hm.grid.patch_l0 == pytest.approx(125)
        for _ in predict_slide(slide, model, hm):
            pass
    done = [i for i, rc in enumerate(placed) if hm.patch_done[rc]]
    assert len(done) >= 12  # pale real patches may fall below the tissue mask
    got = np.array([hm.patch_prob[rc] for rc in placed])[done]
    # Same cells; only resampling (bicubic up, box down) and JPEG noise differ, which the model
    # feels (one patch moves by ~0.25). A misaligned assignment would be far worse.
    err = np.abs(got - expected[done]).mean()
    misaligned = np.abs(got - np.roll(expected[done], 1)).mean()
    assert err < 0.08 and np.corrcoef(got, expected[done])[0, 1] > 0.9
    assert misaligned > 3 * err


def test_no_mpp_slide_needs_a_resolution(slide_no_mpp, model: LoadedModel) -> None:
    path, _ = slide_no_mpp
    with open_slide(path) as slide:
        with pytest.raises(GridError, match="resolution"):
            plan(slide, model, PredictSettings())
    with open_slide(path, mpp=2.0) as slide:
        hm = plan(slide, model, PredictSettings())
        assert hm.grid.patch_l0 == 100


def test_half_stride_averages_overlaps() -> None:
    grid = PatchGrid.build((1000, 1000), 1.0, 4.0, 50, 25)
    assert grid.k == 2 and grid.patch_shape == (9, 9) and grid.cell_shape == (10, 10)
    from inference.heatmap import HeatmapInfo

    hm = Heatmap(HeatmapInfo("s", "m", grid, 0.1), np.ones(grid.patch_shape, bool))
    hm.add(np.array([0, 0]), np.array([0, 1]), np.array([0.2, 0.6], np.float32))
    assert hm.prob[0, 0] == pytest.approx(0.2) and hm.prob[0, 1] == pytest.approx(0.4)
    assert hm.prob[1, 2] == pytest.approx(0.6) and np.isnan(hm.prob[0, 3])
    with pytest.raises(GridError):
        PatchGrid.build((1000, 1000), 1.0, 4.0, 50, 20)


def test_cancel_closes_the_readers(model: LoadedModel) -> None:
    with open_slide(DEMO) as slide:
        settings = PredictSettings(batch_size=32)
        hm = plan(slide, model, settings)
        gen = predict_slide(slide, model, hm, settings=settings)
        first = next(gen)
        gen.close()
        assert first.done == settings.first_batch and hm.patch_done.sum() == settings.first_batch
        # Deterministic: the same cells again give the same probabilities.
        hm2 = plan(slide, model, settings)
        second = next(predict_slide(slide, model, hm2, settings=settings))
    np.testing.assert_array_equal(first.probs, second.probs)


def test_predict_cli_outputs(tmp_path: Path, model: LoadedModel) -> None:
    rc = main(["predict", str(CMU_SVS), "--out", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    hm = Heatmap.load(tmp_path / "CMU-1-Small-Region.heatmap.npz")
    assert hm.complete and hm.info.model_id == model.model_id
    png = np.asarray(Image.open(tmp_path / "CMU-1-Small-Region.heatmap.png"))
    assert png.shape[:2] == hm.grid.cell_shape and png.shape[2] == 4
    with open(tmp_path / "CMU-1-Small-Region.patches.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == int(hm.tissue.sum())
    r = rows[0]
    rect = hm.grid.patch_rect(int(r["row"]), int(r["col"]))  # level-0 px: 200 um at 0.499 um/px
    assert [int(r[k]) for k in ("x_l0", "y_l0", "w_l0", "h_l0")] == [rect.x, rect.y, rect.w, rect.h]
    assert 400 <= rect.w <= 402 and 0 <= float(r["prob_idc"]) <= 1
    assert float(r["prob_idc"]) == pytest.approx(float(hm.patch_prob[int(r["row"]), int(r["col"])]), abs=1e-6)
    # Second run: a cache hit, the same results.
    rc = main(["predict", str(CMU_SVS), "--out", str(tmp_path / "again"), "--device", "cpu"])
    assert rc == 0
    again = Heatmap.load(tmp_path / "again" / "CMU-1-Small-Region.heatmap.npz")
    np.testing.assert_array_equal(again.patch_prob, hm.patch_prob)


def test_predict_cli_bad_slide_and_missing_mpp(tmp_path: Path, slide_no_mpp, capsys) -> None:
    bad = tmp_path / "x.svs"
    bad.write_bytes(b"junk")
    assert main(["predict", str(bad), str(slide_no_mpp[0]), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "x.svs" in err and "--mpp" in err and "Traceback" not in err


def test_edge_cells_are_computed_with_the_outside_as_background(model: LoadedModel) -> None:
    from inference.predict import read_patches

    with open_slide(CMU_SVS) as slide:  # 2220 x 2967 px at 0.499 um/px: patches of 400.8 px
        w0, h0 = slide.dimensions
        hm = plan(slide, model, PredictSettings())
        rows, cols = hm.grid.patch_shape
        assert (rows, cols) == (8, 6)  # 7.4 x 5.5 patches: the partial strips are cells too
        x0, y0, x1, y1 = hm.grid.patch_box(rows - 1, cols - 1)
        assert x0 < w0 < x1 and y0 < h0 < y1
        assert hm.tissue[-1, :].any()  # the bottom strip holds tissue (it was never computed)
        list(predict_slide(slide, model, hm))
        assert hm.complete and hm.patch_done[-1, :].sum() == hm.tissue[-1, :].sum() > 0
        c = int(np.nonzero(hm.tissue[-1, :])[0][0])
        patch = read_patches(slide, hm.grid, np.array([rows - 1]), np.array([c]))[0]
        inside = int((h0 - y0) / hm.grid.scale)  # model pixels still on the slide
        assert (patch[inside + 1 :] == slide.info.background).all()  # padded with the background
        assert not (patch[: inside - 1] == 255).all()
