"""Wider field of view (ModelMeta.margin): training and the slide reader cut the same input,
and the cell grid does not move."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.model import (
    Architecture,
    LoadedModel,
    ModelError,
    ModelMeta,
    build,
    load_checkpoint,
    save_checkpoint,
)
from inference.predict import PredictSettings, heatmap_info, plan, read_patches
from inference.slide import open_slide
from tests.training.conftest import COLS, ROWS, assert_scores_every_cell_where_it_is, grid_cells
from training.data import DataError, PatchSet, load_folder
from training.loop import TrainConfig, evaluate_model, fit, predict_patches
from training.rebuild import rebuild_slides
from training.regions import patches_from_annotations

M = 25


def _model(margin: int, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    net = build(Architecture(depth=10, widen=1)).eval()
    return LoadedModel(net, ModelMeta(arch=Architecture(depth=10, widen=1), margin=margin), "0" * 64)


def test_training_cuts_what_the_slide_reader_reads(tmp_path: Path, layout) -> None:
    root, placed = layout
    data = load_folder(root, margin=M)
    assert data.images.shape[1:] == (100, 100, 3) and data.margin == M
    # The middle of each input is the patch itself.
    np.testing.assert_array_equal(data.with_margin(0).images, load_folder(root).images)
    (rs,) = rebuild_slides(root, tmp_path, quality=None)
    with open_slide(rs.path) as slide:
        model = _model(M)
        grid = plan(slide, model, PredictSettings()).grid
        assert grid.patch_shape == (ROWS, COLS)
        rr, cc = grid_cells(root)
        got = read_patches(slide, grid, rr, cc, margin=M)
        plain = read_patches(slide, grid, rr, cc)
    np.testing.assert_array_equal(got, data.images)
    np.testing.assert_array_equal(got[:, M:-M, M:-M], plain)
    # A neighbour's tissue is in the margin, and outside the slide is white.
    r, c = next((r, c) for r, c in placed if (r, c + 1) in placed)
    i = [(int(a), int(b)) for a, b in zip(rr, cc, strict=True)].index((r, c))
    j = [(int(a), int(b)) for a, b in zip(rr, cc, strict=True)].index((r, c + 1))
    np.testing.assert_array_equal(got[i][M:-M, 50 + M :], plain[j][:, :M])
    top = [k for k, row in enumerate(rr) if row == 0]
    assert top and (got[top][:, :M] == 255).all()


def test_a_margin_model_scores_every_cell_where_it_is(tmp_path: Path, layout) -> None:
    root, _ = layout
    model = _model(M, seed=1)
    expected = predict_patches(model.net, model.meta, load_folder(root, margin=M).images, torch.device("cpu"))
    assert_scores_every_cell_where_it_is(root, model, expected, tmp_path)


def test_margin_is_part_of_the_model_and_of_the_heatmap_cache_key(tmp_path: Path, layout) -> None:
    root, _ = layout
    net = build(Architecture(depth=10, widen=1))
    save_checkpoint(tmp_path / "m0.pt", net, ModelMeta(arch=Architecture(depth=10, widen=1)))
    save_checkpoint(tmp_path / "m25.pt", net, ModelMeta(arch=Architecture(depth=10, widen=1), margin=M))
    a, b = load_checkpoint(tmp_path / "m0.pt"), load_checkpoint(tmp_path / "m25.pt")
    assert (a.meta.margin, b.meta.margin, b.meta.input_px) == (0, M, 100)
    (rs,) = rebuild_slides(root, tmp_path / "slides", quality=None)
    with open_slide(rs.path) as slide:
        ia, ib = heatmap_info(slide, a, PredictSettings()), heatmap_info(slide, b, PredictSettings())
    assert ia.grid == ib.grid and ia != ib  # the same cells, not the same heatmap
    with pytest.raises(ModelError, match="margin"):
        ModelMeta(margin=-1)
    raw = torch.load(tmp_path / "m25.pt", weights_only=True)
    raw["meta"] = raw["meta"].replace('"margin": 25', '"margin": 900')
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="margin around each patch") as err:
        load_checkpoint(tmp_path / "bad.pt")
    assert str(err.value).count(".") == 1


def test_patch_sets_crop_to_a_model_and_refuse_a_wider_one(layout) -> None:
    root, _ = layout
    wide = load_folder(root, margin=M)
    narrow = wide.with_margin(10)
    assert narrow.images.shape[1:3] == (70, 70)
    np.testing.assert_array_equal(narrow.images, wide.images[:, 15:-15, 15:-15])
    with pytest.raises(DataError, match="cut with 10 px"):
        narrow.with_margin(M)
    both = PatchSet.concat([wide, load_folder(root)])
    assert both.margin == 0 and both.images.shape[1:3] == (50, 50)
    # The plain model judges the wide set on its middle.
    report = evaluate_model(_model(0), wide, torch.device("cpu"))
    assert report["patch"]["n"] == len(wide)


def test_unpositioned_patches_cannot_feed_a_margin_model(tmp_path: Path, layout) -> None:
    root, _ = layout
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(root.rglob("*.png"))[:4]):
        (flat / f"p2_crop{i}_class{f.name[-5]}.png").write_bytes(f.read_bytes())
    assert len(load_folder(flat)) == 4  # fine for a model that needs no surroundings
    with pytest.raises(DataError, match="x, y position") as err:
        load_folder(flat, margin=M)
    assert str(err.value).count(".") == 1


def test_regions_of_a_slide_are_cut_with_the_models_margin(tmp_path: Path, layout) -> None:
    import shapely

    from inference.annotations import Annotation

    root, placed = layout
    (rs,) = rebuild_slides(root, tmp_path, quality=None)
    region = Annotation(shapely.box(0, 0, COLS * 50, ROWS * 50), "IDC")
    with open_slide(rs.path) as slide:
        wide = patches_from_annotations(slide, [region], ModelMeta(margin=M))
        plain = patches_from_annotations(slide, [region], ModelMeta())
    assert wide.margin == M and len(wide) == ROWS * COLS
    np.testing.assert_array_equal(wide.with_margin(0).images, plain.images)


def test_fit_trains_and_saves_a_margin_model(tmp_path: Path, few_patients: Path) -> None:
    data = load_folder(few_patients, limit_per_patient=20, margin=M)
    groups = data.groups.astype(str)
    val_g = np.unique(groups)[:4]
    train, val = data.subset(~np.isin(groups, val_g)), data.subset(np.isin(groups, val_g))
    config = TrainConfig(out=str(tmp_path / "m.pt"), arch=Architecture(depth=10, widen=1), epochs=1,
                         samples_per_epoch=128, batch_size=64, margin=M, val_jpeg_quality=None)
    done = list(fit(config, train, val))[-1]
    model = load_checkpoint(done.checkpoint)
    assert model.meta.margin == M and model.meta.provenance["config"]["margin"] == M
    # Fine-tuning keeps the start model's margin and refuses another.
    tune = dataclasses.replace(config, out=str(tmp_path / "t.pt"), init=done.checkpoint, margin=10)
    with pytest.raises(ModelError, match="keeps its start model's margin"):
        list(fit(tune, train, val))
    assert not (tmp_path / "t.pt").exists()
    tuned = list(fit(dataclasses.replace(tune, margin=0), train, val))[-1]
    assert load_checkpoint(tuned.checkpoint).meta.margin == M


def test_train_and_evaluate_cli_with_a_margin(tmp_path: Path, few_patients: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from viewer.cli import main

    root, out = few_patients, tmp_path / "wide.pt"
    common = ["--limit-per-patient", "20", "--device", "cpu"]
    rc = main(["train", str(root), "--out", str(out), *common, "--epochs", "1", "--samples-per-epoch", "128",
               "--batch-size", "64", "--depth", "10", "--widen", "1", "--margin", str(M)])
    assert rc == 0 and load_checkpoint(out).meta.margin == M
    capsys.readouterr()
    assert main(["evaluate", str(root), "--model", str(out), *common, "--jpeg-quality", "80", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == len(load_folder(root, limit_per_patient=20))
    rc = main(["train", str(root), "--out", str(tmp_path / "t.pt"), *common, "--init", str(out), "--margin", "10"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "keeps its start model's margin" in err and "Traceback" not in err
    assert not (tmp_path / "t.pt").exists()
