"""A network at a coarser resolution (ModelMeta.mpp a whole multiple of the patches' 4 um/px):
training averages the patch folder's pixels down to what the slide reader reads there, the cells
stay the data set's 200 um patches, and the train command makes one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.model import Architecture, LoadedModel, ModelMeta, build, load_checkpoint
from inference.predict import PredictSettings, plan, predict_slide, read_patches
from inference.slide import open_slide
from tests.training.conftest import COLS, ROWS, grid_cells
from training.data import DataError, PatchSet, folder_factor, load_folder
from training.loop import predict_patches
from training.rebuild import rebuild_slides
from training.session import FolderSource, load_sources

#: 25 px patches at 8 um/px with 12 px (96 um) of slide around them: 49 x 49 px inputs.
COARSE = ModelMeta(arch=Architecture(depth=10, widen=1), patch_size=25, mpp=8.0, margin=12, mean=(0.6,) * 3,
                   std=(0.2,) * 3)


def test_averaging_takes_the_mean_of_each_block_and_halves_the_margin() -> None:
    images = np.arange(2 * 6 * 6 * 3, dtype=np.uint8).reshape(2, 6, 6, 3)
    images[0, 0, 0, 0], images[0, 0, 1, 0], images[0, 1, 0, 0], images[0, 1, 1, 0] = 0, 1, 1, 1
    data = PatchSet(images, np.array([0, 1]), np.array(["a", "b"]), np.array(["s", "s"]), margin=2)
    half = data.averaged(2)
    assert half.images.shape == (2, 3, 3, 3) and half.margin == 1 and half.images.dtype == np.uint8
    block = images[1, 2:4, 4:6, 2].astype(float)
    assert half.images[1, 1, 2, 2] == round(block.mean())
    assert half.images[0, 0, 0, 0] == 1  # 0.75 rounds to the nearest level
    np.testing.assert_array_equal(half.labels, data.labels)
    assert data.averaged(1) is data


def test_only_whole_multiples_that_divide_the_patch_are_resolutions() -> None:
    assert [folder_factor(m) for m in (4.0, 8.0, 20.0)] == [1, 2, 5]
    for mpp in (2.0, 6.0, 12.0):  # finer than the data, no whole multiple, 50 px not divisible by 3
        with pytest.raises(DataError, match="whole multiple") as err:
            folder_factor(mpp)
        assert str(err.value).count(". ") == 0


def test_training_averages_down_to_what_the_slide_reader_reads(tmp_path: Path, layout) -> None:
    root, _ = layout
    data, _ = load_sources([FolderSource(str(root))], COARSE)
    assert data.images.shape[1:] == (49, 49, 3) and data.margin == 12
    # The same as cutting 24 px around each 50 px patch at 4 um/px and averaging 2 x 2.
    np.testing.assert_array_equal(data.images, load_folder(root, margin=24).averaged(2).images)
    (rs,) = rebuild_slides(root, tmp_path, quality=None)
    torch.manual_seed(3)
    net = build(COARSE.arch).eval()
    model = LoadedModel(net, COARSE, "0" * 64)
    with open_slide(rs.path) as slide:
        hm = plan(slide, model, PredictSettings(batch_size=8, first_batch=3))
        assert hm.grid.patch_shape == (ROWS, COLS) and hm.grid.patch_px == 25  # the same 200 um cells
        rr, cc = grid_cells(root)
        read = read_patches(slide, hm.grid, rr, cc, margin=12)
        list(predict_slide(slide, model, hm))
    # The reader resizes in two passes, each rounded to a level: at most one level apart.
    assert np.abs(read.astype(int) - data.images.astype(int)).max() <= 1
    # And each cell holds its own patch's score: a one-cell shift would show.
    expected = predict_patches(net, COARSE, data.images, torch.device("cpu"))
    got = hm.patch_prob[rr, cc]
    done = np.isfinite(got)  # cells the tissue mask keeps
    assert done.sum() >= 18 and np.ptp(expected) > 1e-3
    err = np.abs(got[done] - expected[done]).max()
    assert err < 2e-3 and np.abs(got[done] - np.roll(expected[done], 1)).max() > 10 * err


def test_train_cli_at_a_coarser_resolution(tmp_path: Path, few_patients: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from viewer.cli import main

    root, out = few_patients, tmp_path / "coarse.pt"
    common = ["--limit-per-patient", "20", "--device", "cpu"]
    small = ["--epochs", "1", "--samples-per-epoch", "128", "--batch-size", "64", "--depth", "10", "--widen", "1"]
    rc = main(["train", str(root), "--out", str(out), *common, *small, "--model-mpp", "8", "--margin", "12"])
    assert rc == 0
    meta = load_checkpoint(out).meta
    assert (meta.patch_size, meta.mpp, meta.margin, meta.input_px) == (25, 8.0, 12, 49)
    assert meta.provenance["config"]["mpp"] == 8.0
    capsys.readouterr()
    assert main(["evaluate", str(root), "--model", str(out), *common, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == len(load_folder(root, limit_per_patient=20))
    for extra, message in ((["--model-mpp", "6"], "whole multiple"),
                           (["--model-mpp", "8", "--init", str(out)], "keeps its start model's resolution")):
        rc = main(["train", str(root), "--out", str(tmp_path / "bad.pt"), *common, *small, *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad.pt").exists()
