from __future__ import annotations

import csv
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.model import (
    Architecture,
    ModelError,
    ModelMeta,
    WideResNet,
    load_checkpoint,
    save_checkpoint,
)
from tests.conftest import need_patches
from training.data import (
    PatchSet,
    evaluation_weights,
    find_patch_files,
    group_weights,
    load_folder,
    load_patch,
    split_groups,
)
from training.loop import StepReport, TrainConfig, fit
from viewer.cli import main


@pytest.fixture(scope="module")
def small_real() -> PatchSet:
    """At most 24 patches from each of the real patients (patient 8975 left out)."""
    return load_folder(need_patches(), exclude_patients=["8975"], limit_per_patient=24, seed=1)


def test_patch_names_and_patients() -> None:
    files = find_patch_files(need_patches())
    assert len(files) > 30_000
    path, patient, label = files[0]
    assert path.name.startswith(patient + "_") and path.name.endswith(f"class{label}.png")
    assert path.parent.name == str(label)


@pytest.mark.parametrize("margin", [0, 6])
def test_loading_chosen_patients_gives_their_patches_of_a_whole_load(few_patients: Path, margin: int) -> None:
    """`evaluate --patient` reads only those patients, and gets the very patches (the same
    draw of the limit) a load of the whole folder gives them."""
    whole = load_folder(few_patients, limit_per_patient=6, seed=5, margin=margin)
    chosen = sorted(set(whole.groups.tolist()))[3::4]
    part = load_folder(few_patients, limit_per_patient=6, seed=5, margin=margin, patients=chosen)
    keep = np.isin(whole.groups.astype(str), chosen)
    assert 0 < len(part) < len(whole) and sorted(set(part.groups.tolist())) == chosen
    assert np.array_equal(part.images, whole.images[keep]) and np.array_equal(part.labels, whole.labels[keep])
    assert len(load_folder(few_patients, margin=margin, patients=["no such patient"])) == 0


def test_small_edge_patches_are_padded() -> None:
    root = need_patches()
    with open(root / "manifest.csv") as fh:
        small = next(r for r in csv.DictReader(fh) if int(r["width"]) < 50 or int(r["height"]) < 50)
    arr = load_patch(root / small["path"])
    assert arr is not None and arr.shape == (50, 50, 3)
    w, h = int(small["width"]), int(small["height"])
    assert (arr[h:, :] == 255).all() and (arr[:, w:] == 255).all()


def test_split_never_puts_a_patient_in_two_parts(small_real: PatchSet) -> None:
    parts = split_groups(small_real.groups, small_real.labels, [0.7, 0.15, 0.15], seed=3)
    sets = [set(small_real.groups[m].tolist()) for m in parts]
    assert all(len(s) > 5 for s in sets)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(m.sum() for m in parts) == len(small_real)
    again = split_groups(small_real.groups, small_real.labels, [0.7, 0.15, 0.15], seed=3)
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))  # seeded


def test_weights_balance_patients_and_classes() -> None:
    groups = np.array(["big"] * 90 + ["small"] * 10, dtype=object)
    labels = np.array([0] * 60 + [1] * 30 + [0] * 5 + [1] * 5)
    w = group_weights(groups, labels)
    assert w[labels == 1].sum() == pytest.approx(w[labels == 0].sum())
    assert w[0] < w[95]  # a patch of the big patient counts less
    ev = evaluation_weights(groups)
    assert ev[:90].sum() / ev[90:].sum() == pytest.approx(3.0)  # sqrt(90)/sqrt(10)


def test_loss_falls_on_real_patches(small_real: PatchSet, tmp_path: Path) -> None:
    parts = split_groups(small_real.groups, small_real.labels, [0.8, 0.2], seed=0)
    train, val = small_real.subset(parts[0]), small_real.subset(parts[1])
    config = TrainConfig(out=str(tmp_path / "m.pt"), arch=Architecture(10, 1), epochs=1,
                         samples_per_epoch=64 * 40, batch_size=64, lr=3e-3, augment=False, device="cpu")
    losses = [r.loss for r in fit(config, train, val) if isinstance(r, StepReport)]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < np.mean(losses[:4]) - 0.1
    model = load_checkpoint(tmp_path / "m.pt")
    assert 0 < model.meta.threshold < 1
    assert model.meta.metrics["validation"]["patient_weighted"]["auc"] > 0.6


def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = WideResNet(Architecture(10, 2, 0.1))
    meta = ModelMeta(arch=Architecture(10, 2, 0.1), mpp=3.9, threshold=0.37, provenance={"data": ["x"]})
    sha = save_checkpoint(tmp_path / "a.pt", net, meta)
    loaded = load_checkpoint(tmp_path / "a.pt")
    assert loaded.meta == meta and loaded.sha256 == sha
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.net.state_dict()[k]), k
    save_checkpoint(tmp_path / "b.pt", loaded.net, loaded.meta)
    assert (tmp_path / "b.pt").read_bytes() == (tmp_path / "a.pt").read_bytes()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_pickle_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "idc-viewer-checkpoint/1", "meta": "{}", "state_dict": _Payload(marker)}, evil)
    with pytest.raises(ModelError, match="not a valid model file"):
        load_checkpoint(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_corrupt_and_mismatched_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError):
        load_checkpoint(tmp_path / "junk.pt")
    net = WideResNet(Architecture(10, 1))
    save_checkpoint(tmp_path / "lie.pt", net, ModelMeta(arch=Architecture(10, 2)))
    with pytest.raises(ModelError, match="do not match"):
        load_checkpoint(tmp_path / "lie.pt")
    with pytest.raises(ModelError):
        load_checkpoint(tmp_path / "missing.pt")


def test_train_and_evaluate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = need_patches()
    out = tmp_path / "cli.pt"
    rc = main(["train", str(root), "--out", str(out), "--exclude-patient", "8975", "--limit-per-patient", "12",
               "--epochs", "1", "--samples-per-epoch", "256", "--batch-size", "64", "--depth", "10",
               "--widen", "1", "--device", "cpu"])
    assert rc == 0 and out.exists()
    meta = load_checkpoint(out).meta
    test_patients = meta.provenance["test_patients"]
    assert "8975" not in test_patients + meta.provenance["val_patients"]
    assert "test" in meta.metrics
    capsys.readouterr()
    rc = main(["evaluate", str(root), "--model", str(out), "--limit-per-patient", "12", "--patients", "test", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    per_patient = Counter(patient for _, patient, _ in find_patch_files(root))
    assert result["n"] == sum(min(12, per_patient[p]) for p in test_patients) > 200  # those patients only
    for k in ("accuracy", "balanced_accuracy", "f1", "auc"):
        assert 0.0 <= result[k] <= 1.0


def test_cli_errors_are_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["evaluate", str(tmp_path), "--model", str(tmp_path / "none.pt")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("idc-viewer evaluate: error:") and "Traceback" not in err


def test_resume_continues_from_the_last_epoch(small_real: PatchSet, tmp_path: Path) -> None:
    from training.loop import EpochReport

    parts = split_groups(small_real.groups, small_real.labels, [0.8, 0.2], seed=0)
    # A quarter of the validation patches: this test is about epochs, not about how well they score.
    train, val = small_real.subset(parts[0]), small_real.subset(parts[1] & (np.arange(len(small_real)) % 4 == 0))
    config = TrainConfig(out=str(tmp_path / "r.pt"), arch=Architecture(10, 1), epochs=3, samples_per_epoch=128,
                         batch_size=64, device="cpu", patience=10)
    gen = fit(config, train, val)
    epochs = []
    for r in gen:
        if isinstance(r, EpochReport):
            epochs.append(r.epoch)
            break  # stop after one epoch, as a killed process would
    gen.close()
    assert epochs == [1]
    from dataclasses import replace

    resumed = [r.epoch for r in fit(replace(config, resume=True), train, val) if isinstance(r, EpochReport)]
    assert resumed == [2, 3]


def test_hard_negatives_are_the_start_models_false_calls_drawn_more_often(small_real: PatchSet) -> None:
    """Mining with the shipped model: the non-IDC patches it calls IDC (on JPEG q80, as on slides)
    are drawn X times as often as the other non-IDC ones, and each class keeps its half."""
    from resources import shipped_model_path
    from training.augment import jpeg_batch
    from training.loop import _mine_hard_negatives, predict_patches

    start = load_checkpoint(shipped_model_path())
    data = small_real.subset(np.arange(len(small_real)) < 300).with_margin(0)
    data = PatchSet(np.pad(data.images, ((0, 0), (12, 12), (12, 12), (0, 0)), constant_values=255),
                    data.labels, data.groups, data.sources, 12)  # the margin the shipped model sees
    config = TrainConfig(out="", init=str(shipped_model_path()), hard_negatives=4.0)
    base = group_weights(data.groups, data.labels)
    w = _mine_hard_negatives(base, start.net, start.meta, data, config, torch.device("cpu"))
    p = predict_patches(start.net, start.meta, jpeg_batch(data.images, 80, config.seed), torch.device("cpu"))
    neg = data.labels == 0
    hard = neg & (p >= start.meta.threshold)
    assert 0 < hard.sum() < neg.sum()
    ratio = (w / base)
    assert np.allclose(ratio[hard] / ratio[neg & ~hard].mean(), 4.0) and np.allclose(ratio[~neg], 1.0)
    assert w[neg].sum() == pytest.approx(base[neg].sum()) and w[~neg].sum() == pytest.approx(base[~neg].sum())
    with pytest.raises(ModelError):
        _mine_hard_negatives(base, start.net, start.meta, data, TrainConfig(out="", hard_negatives=4.0),
                             torch.device("cpu"))
