"""Augmentation: seeded and deterministic, JPEG round trips that really compress, split reuse."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.model import Architecture, ModelMeta, WideResNet, save_checkpoint
from tests.conftest import need_patches, pattern
from training.augment import (
    AcquisitionConfig,
    acquire,
    augment_batch,
    jpeg_batch,
    jpeg_roundtrip,
    stain,
)
from training.data import PatchSet, find_patch_files, load_folder
from training.session import split, split_of


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    return load_folder(need_patches(), exclude_patients=["8975"], limit_per_patient=2, seed=3).images[:64]


def _run(images: np.ndarray, seed: int) -> torch.Tensor:
    return augment_batch(images, torch.Generator().manual_seed(seed), np.random.default_rng(seed), torch.device("cpu"))


def test_augmentation_is_seeded_and_deterministic(patches: np.ndarray) -> None:
    a, b, c = _run(patches, 7), _run(patches, 7), _run(patches, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (len(patches), 3, 50, 50) and float(a.min()) >= 0 and float(a.max()) <= 1


def test_jpeg_roundtrip_compresses_and_keeps_the_image(patches: np.ndarray) -> None:
    img = patches[0]
    q90 = jpeg_roundtrip(img, 90, 2, (3, 5))
    q50 = jpeg_roundtrip(img, 50, 2, (3, 5))
    assert q90.shape == img.shape and q90.dtype == np.uint8
    err90 = np.abs(q90.astype(int) - img).mean()
    err50 = np.abs(q50.astype(int) - img).mean()
    assert 0 < err90 < err50 < 20  # lossy, worse at lower quality, still the same tissue
    # The block-grid offset changes the artefacts, not the content.
    assert not np.array_equal(q90, jpeg_roundtrip(img, 90, 2, (0, 0)))
    # A fixed evaluation round trip is reproducible.
    assert np.array_equal(jpeg_batch(patches[:4], 80, seed=1), jpeg_batch(patches[:4], 80, seed=1))


def test_acquisition_mixes_lossless_jpeg_and_resampled(patches: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    img = patches[1]
    outs = [acquire(img, rng, AcquisitionConfig()) for _ in range(200)]
    unchanged = sum(np.array_equal(o, img) for o in outs)
    assert 10 < unchanged < 60  # about 15% left lossless
    assert all(o.shape == img.shape for o in outs)


def test_hed_stain_jitter_of_zero_is_identity_up_to_colour_jitter() -> None:
    x = torch.from_numpy(pattern(32, 32)).permute(2, 0, 1)[None].float() / 255
    gen = torch.Generator().manual_seed(0)
    y = stain(x.repeat(8, 1, 1, 1), gen)
    # Each sample is jittered differently, but stays a valid image of the same structure.
    assert y.shape == (8, 3, 32, 32)
    corr = [np.corrcoef(x[0].flatten(), y[i].flatten())[0, 1] for i in range(8)]
    assert min(corr) > 0.8
    assert len({round(float(y[i].mean()), 4) for i in range(8)}) == 8


def test_split_from_reuses_a_checkpoints_patients(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.pt"
    meta = ModelMeta(arch=Architecture(10, 1), provenance={"val_patients": ["b"], "test_patients": ["c"]})
    save_checkpoint(ckpt, WideResNet(meta.arch), meta)
    groups = np.array(list("aabbccdd"), dtype=object)
    data = PatchSet(np.zeros((8, 50, 50, 3), np.uint8), np.array([0, 1] * 4), groups, groups)
    train, val, test = split(data, 0.15, 0.15, 0, split_of(str(ckpt)))
    assert set(val.groups) == {"b"} and set(test.groups) == {"c"} and set(train.groups) == {"a", "d"}


def test_patch_folders_follow_symlinks(tmp_path: Path) -> None:
    root = need_patches()
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    patients = sorted(p.name for p in root.iterdir() if p.is_dir())[:3]
    for pt in patients:
        os.symlink(root / pt, split_dir / pt)
    found = find_patch_files(split_dir)
    assert {pt for _, pt, _ in found} == set(patients)
