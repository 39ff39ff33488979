"""Ensembles (inference.model.Ensemble): each network sees its own view of the patch, at its own
resolution, the model's logit is their weighted logit, on patches and on a slide, and an ensemble
fine-tunes as one model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.context import logit
from inference.model import (
    Architecture,
    Ensemble,
    LoadedModel,
    ModelError,
    ModelMeta,
    build,
    ensemble,
    load_checkpoint,
    save_checkpoint,
)
from tests.training.conftest import assert_scores_every_cell_where_it_is
from training.data import load_folder
from training.loop import TrainConfig, fit, predict_patches

M = 25
ARCH = Architecture(depth=10, widen=1)
SPLIT = {"val_patients": ["a"], "test_patients": ["b"]}
CPU = torch.device("cpu")


def _member(tmp_path: Path, name: str, margin: int, seed: int, mean: float, **meta: object) -> LoadedModel:
    """A small trained-looking network saved and loaded as a real checkpoint."""
    torch.manual_seed(seed)
    path = tmp_path / f"{name}.pt"
    fields = {"provenance": SPLIT, **meta}
    save_checkpoint(path, build(ARCH), ModelMeta(arch=ARCH, margin=margin, mean=(mean,) * 3, std=(0.2, 0.25, 0.3),
                                                 **fields))  # type: ignore[arg-type]
    return load_checkpoint(path)


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[LoadedModel, LoadedModel, LoadedModel]:
    """A plain and a margin network, and their ensemble (weights 3 : 1) saved and loaded."""
    a, b = _member(tmp_path, "a", 0, 1, 0.6), _member(tmp_path, "b", M, 2, 0.4)
    net, meta = ensemble([a, b], [3.0, 1.0])
    save_checkpoint(tmp_path / "e.pt", net, meta)
    return a, b, load_checkpoint(tmp_path / "e.pt")


def _expected(a: LoadedModel, b: LoadedModel, wide: np.ndarray) -> np.ndarray:
    """What the ensemble must give: each member on its own view, 3 : 1 in logit."""
    pa = predict_patches(a.net, a.meta, wide[:, M:-M, M:-M], CPU)
    pb = predict_patches(b.net, b.meta, wide, CPU)
    return 1 / (1 + np.exp(-(0.75 * logit(pa) + 0.25 * logit(pb))))


def test_an_ensemble_is_its_networks_weighted_logit(pair, layout) -> None:
    a, b, e = pair
    assert isinstance(e.net, Ensemble)
    assert (e.meta.margin, e.meta.input_px, e.meta.name) == (M, 100, "WRN-10-1+WRN-10-1")
    assert e.model_id.startswith("WRN-10-1+WRN-10-1-") and e.meta.provenance["val_patients"] == ["a"]
    assert [m.weight for m in e.meta.members] == [3.0, 1.0]
    wide = load_folder(layout[0], margin=M).images
    got = predict_patches(e.net, e.meta, wide, CPU)
    np.testing.assert_allclose(got, _expected(a, b, wide), atol=1e-5)
    # Each member really sees its own view: the plain one alone would score differently.
    assert np.abs(got - predict_patches(a.net, a.meta, wide[:, M:-M, M:-M], CPU)).max() > 1e-3


def test_an_ensembles_heatmap_scores_every_cell_where_it_is(tmp_path: Path, pair, layout) -> None:
    a, b, e = pair
    root, _ = layout
    assert_scores_every_cell_where_it_is(root, e, _expected(a, b, load_folder(root, margin=M).images), tmp_path)


def _averaged(images: np.ndarray, crop: int, k: int) -> np.ndarray:
    """The views in [0, 1], ``crop`` px less on every side, each k x k block averaged (numpy)."""
    x = images[:, crop : images.shape[1] - crop, crop : images.shape[2] - crop].astype(np.float64) / 255
    n, h, w, c = x.shape
    return x.reshape(n, h // k, k, w // k, k, c).mean(axis=(2, 4))


def test_a_coarser_network_sees_the_same_patch_averaged_down(tmp_path: Path, pair, layout) -> None:
    """A network working at 8 um/px on 25 px patches with 12 px (96 um) around them joins one at
    4 um/px: the ensemble reads the slide at 4 um/px and the coarse network sees each 2 x 2 block
    of its view averaged, which is the same patch with the same tissue around it."""
    a, b, _ = pair
    coarse = _member(tmp_path, "coarse", 12, 5, 0.45, mpp=8.0, patch_size=25)
    net, meta = ensemble([coarse, a, b], [1.0, 1.0, 2.0])
    save_checkpoint(tmp_path / "mixed.pt", net, meta)
    e = load_checkpoint(tmp_path / "mixed.pt")
    # The finest network's patches and resolution; the widest view: b's 25 px, the coarse 24.
    assert (e.meta.mpp, e.meta.patch_size, e.meta.margin) == (4.0, 50, M)
    root, _ = layout
    wide = load_folder(root, margin=M).images
    x = (_averaged(wide, 1, 2) - np.array(coarse.meta.mean)) / np.array(coarse.meta.std)
    with torch.no_grad():
        lc = coarse.net(torch.from_numpy(x.transpose(0, 3, 1, 2)).float()).numpy()
    la = logit(predict_patches(a.net, a.meta, wide[:, M:-M, M:-M], CPU))
    lb = logit(predict_patches(b.net, b.meta, wide, CPU))
    expected = 1 / (1 + np.exp(-(0.25 * lc + 0.25 * la + 0.5 * lb)))
    np.testing.assert_allclose(predict_patches(e.net, e.meta, wide, CPU), expected, atol=1e-5)
    assert_scores_every_cell_where_it_is(root, e, expected, tmp_path)


def test_networks_that_cannot_be_joined_get_one_sentence(tmp_path: Path, pair) -> None:
    a, b, e = pair
    cases = [
        ([a], [1.0], "two or more single networks"),
        ([a, e], [1.0, 1.0], "two or more single networks"),
        ([a, b], [1.0], "one weight per network"),
        ([a, b], [1.0, 0.0], "weight above 0"),
        ([a, _member(tmp_path, "c", 0, 3, 0.5, patch_size=48)], [1.0, 1.0], "score different patches"),
        ([a, _member(tmp_path, "d", 0, 3, 0.5, mpp=2.0)], [1.0, 1.0], "score different patches"),
        # 6 um/px is no whole multiple of 4, and 25 px at 12 um/px is a wider patch than 50 at 4.
        ([a, _member(tmp_path, "g", 0, 3, 0.5, mpp=6.0, patch_size=33)], [1.0, 1.0], "whole multiple"),
        ([a, _member(tmp_path, "h", 0, 3, 0.5, mpp=12.0, patch_size=25)], [1.0, 1.0], "whole multiple"),
        ([a, _member(tmp_path, "f", 0, 3, 0.5, provenance={"val_patients": ["z"]})], [1.0, 1.0], "different patients"),
    ]
    for models, weights, message in cases:
        with pytest.raises(ModelError, match=message) as err:
            ensemble(models, weights)
        assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
    with pytest.raises(ModelError, match="made from trained networks"):
        build(Architecture(family="ensemble"))
    # A file whose metadata lost its members, or whose members do not match its weights.
    raw = torch.load(tmp_path / "e.pt", weights_only=True)
    meta = json.loads(raw["meta"])
    for name, change in (("nomembers", lambda m: m.update(members=[])),
                         ("wider", lambda m: m["members"][1]["meta"]["arch"].update(widen=2))):
        m = json.loads(json.dumps(meta))
        change(m)
        torch.save({**raw, "meta": json.dumps(m)}, tmp_path / f"{name}.pt")
        with pytest.raises(ModelError) as err:
            load_checkpoint(tmp_path / f"{name}.pt")
        assert str(err.value).count(". ") == 0


def _param(net: torch.nn.Module, name: str) -> torch.Tensor:
    return dict(net.named_parameters())[name].detach().clone()


def test_an_ensemble_fine_tunes_as_one_model(tmp_path: Path, pair, few_patients: Path) -> None:
    _, _, e = pair
    data = load_folder(few_patients, limit_per_patient=12, margin=M)
    groups = data.groups.astype(str)
    val_g = np.unique(groups)[:4]
    train, val = data.subset(~np.isin(groups, val_g)), data.subset(np.isin(groups, val_g))
    config = TrainConfig(out=str(tmp_path / "t.pt"), epochs=1, samples_per_epoch=64, batch_size=32,
                         init=str(e.path), val_jpeg_quality=None, ema=0)
    done = list(fit(config, train, val))[-1]
    tuned = load_checkpoint(done.checkpoint)
    assert isinstance(tuned.net, Ensemble) and tuned.meta.members == e.meta.members
    for i in (0, 1):  # both networks learned
        assert not torch.equal(_param(tuned.net, f"members.{i}.stem.weight"), _param(e.net, f"members.{i}.stem.weight"))
    frozen = list(fit(dataclasses.replace(config, out=str(tmp_path / "h.pt"), freeze_trunk=True), train, val))[-1]
    heads = load_checkpoint(frozen.checkpoint).net
    for i in (0, 1):  # only the heads did
        assert torch.equal(_param(heads, f"members.{i}.stem.weight"), _param(e.net, f"members.{i}.stem.weight"))
        assert not torch.equal(_param(heads, f"members.{i}.head.weight"), _param(e.net, f"members.{i}.head.weight"))


def test_ensemble_cli(tmp_path: Path, pair, few_patients: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from viewer.cli import main

    a, b, _ = pair
    out = tmp_path / "cli.pt"
    assert main(["ensemble", str(a.path), str(b.path), "--weights", "2", "1", "--out", str(out)]) == 0
    made = load_checkpoint(out)
    assert [m.weight for m in made.meta.members] == [2.0, 1.0] and made.meta.margin == M
    assert "calibrate it" in capsys.readouterr().err
    # evaluate reads margin patches for it and scores them.
    rc = main(["evaluate", str(few_patients), "--model", str(out), "--limit-per-patient", "5", "--device", "cpu",
               "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["n"] == len(load_folder(few_patients, limit_per_patient=5))
    bad = tmp_path / "bad.pt"
    assert main(["ensemble", str(a.path), str(b.path), "--weights", "1", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "one weight per network" in err and "Traceback" not in err and not bad.exists()
