"""Distillation: a student trained towards a teacher's probabilities as well as the labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from inference.context import logit
from inference.model import (
    Architecture,
    ModelError,
    ModelMeta,
    WideResNet,
    load_checkpoint,
    save_checkpoint,
)
from tests.conftest import need_patches
from training.data import PatchSet, load_folder, split_groups
from training.loop import TrainConfig, fit, predict_patches

#: The probability the constant teacher gives every patch, far from the labels' IDC share.
TEACHER_P = 0.9


@pytest.fixture(scope="module")
def parts() -> tuple[PatchSet, PatchSet]:
    data = load_folder(need_patches(), exclude_patients=["8975"], limit_per_patient=8, seed=2)
    train, val = split_groups(data.groups, data.labels, [0.8, 0.2], seed=0)
    return data.subset(train), data.subset(val)


def _constant_teacher(path: Path, margin: int = 0) -> Path:
    """A network that calls every patch IDC with probability TEACHER_P, whatever it shows."""
    arch = Architecture(depth=10, widen=1)
    net = WideResNet(arch)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(float(logit(TEACHER_P)))
    save_checkpoint(path, net, ModelMeta(arch=arch, margin=margin))
    return path


def _mean_p(checkpoint: str, val: PatchSet) -> float:
    model = load_checkpoint(checkpoint)
    return float(predict_patches(model.net, model.meta, val.images, torch.device("cpu")).mean())


def test_a_student_follows_its_teacher_as_far_as_its_share(tmp_path: Path, parts) -> None:
    train, val = parts
    teacher = _constant_teacher(tmp_path / "teacher.pt")
    config = TrainConfig(out=str(tmp_path / "labels.pt"), arch=Architecture(depth=10, widen=1), epochs=1,
                         samples_per_epoch=32 * 16, batch_size=32, lr=1e-2, augment=False, device="cpu",
                         val_jpeg_quality=None, ema=0)
    runs = {0.0: config}
    for share in (0.5, 1.0):
        runs[share] = dataclasses.replace(config, out=str(tmp_path / f"kd{share}.pt"), teacher=str(teacher),
                                          distill=share)
    mean_p = {share: _mean_p(list(fit(c, train, val))[-1].checkpoint, val) for share, c in runs.items()}
    # The labels are balanced by the sampler: alone they keep the mean near 0.5; the teacher's
    # 0.9 pulls it up by its share of the targets.
    assert mean_p[0.0] < 0.6
    assert mean_p[0.0] < mean_p[0.5] < mean_p[1.0]
    assert mean_p[1.0] > 0.75
    assert load_checkpoint(runs[1.0].out).meta.provenance["config"]["teacher"] == str(teacher)


def test_a_teacher_that_cannot_teach_gets_one_sentence(tmp_path: Path, parts) -> None:
    train, val = parts
    wide = _constant_teacher(tmp_path / "wide.pt", margin=6)
    config = TrainConfig(out=str(tmp_path / "s.pt"), arch=Architecture(depth=10, widen=1), epochs=1,
                         samples_per_epoch=64, batch_size=64, augment=False, device="cpu", teacher=str(wide))
    with pytest.raises(ModelError, match="see no more around each patch than the student"):
        list(fit(config, train, val))
    with pytest.raises(ValueError, match=r"share of the targets must be in \(0, 1\]"):
        list(fit(dataclasses.replace(config, teacher=str(_constant_teacher(tmp_path / "t.pt")), distill=1.5),
                 train, val))
    assert not (tmp_path / "s.pt").exists()


def test_train_cli_passes_the_teacher_on(tmp_path: Path, few_patients: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from viewer.cli import main

    wide = _constant_teacher(tmp_path / "wide.pt", margin=6)
    rc = main(["train", str(few_patients), "--out", str(tmp_path / "s.pt"), "--limit-per-patient", "8",
               "--device", "cpu", "--epochs", "1", "--samples-per-epoch", "64", "--batch-size", "64",
               "--depth", "10", "--widen", "1", "--teacher", str(wide), "--distill", "0.7"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "see no more around each patch than the student" in err and "Traceback" not in err
    assert not (tmp_path / "s.pt").exists()
    rc = main(["train", str(few_patients), "--out", str(tmp_path / "s.pt"), "--distill", "0.7"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "give the teacher with --teacher" in err and len(err.splitlines()) == 1


def test_a_coarser_teacher_sees_the_students_view_averaged_down(tmp_path: Path) -> None:
    """A teacher at 8 um/px (25 px patches) teaches a 4 um/px student of the same 200 um patches:
    it scores the student's augmented pixels averaged 2 x 2, as it was trained to see them."""
    from training.loop import _teacher

    arch = Architecture(depth=10, widen=1)
    torch.manual_seed(4)
    save_checkpoint(tmp_path / "coarse.pt", WideResNet(arch),
                    ModelMeta(arch=arch, patch_size=25, mpp=8.0, mean=(0.6,) * 3, std=(0.2,) * 3))
    teacher = load_checkpoint(tmp_path / "coarse.pt")
    student = ModelMeta(arch=arch, margin=6)
    config = TrainConfig(out=str(tmp_path / "s.pt"), teacher=str(tmp_path / "coarse.pt"))
    probs = _teacher(config, student, torch.device("cpu"))
    assert probs is not None
    x = torch.rand(6, 3, 62, 62, generator=torch.Generator().manual_seed(0))
    middle = x[:, :, 6:-6, 6:-6].numpy().astype("float64")
    pooled = middle.reshape(6, 3, 25, 2, 25, 2).mean(axis=(3, 5))
    with torch.no_grad():
        want = torch.sigmoid(teacher.net((torch.from_numpy(pooled).float() - 0.6) / 0.2))
    got = probs(x)
    assert float(want.std()) > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
