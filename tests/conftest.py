"""Shared fixtures: synthetic pyramidal slides written by tifffile, and the real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from inference.tiff_writer import write_pyramid_from_array  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("IDC_SHARED_DATA", REPO.parent / "shared" / "data"))
PATCHES = SHARED_DATA / "idc_patches"
CMU_SVS = REPO / "resources" / "CMU-1-Small-Region.svs"
DEMO = REPO / "resources" / "demo_idc_8975.tif"


def pattern(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth, non-periodic RGB pattern whose every pixel position is recognisable."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    rng = np.random.default_rng(seed)
    fx, fy = rng.uniform(0.002, 0.02, 3), rng.uniform(0.002, 0.02, 3)
    chans = [127 + 100 * np.sin(xx * fx[c] + yy * fy[c] + c) for c in range(3)]
    return np.clip(np.stack(chans, axis=-1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cache")
    os.environ["IDC_VIEWER_CACHE"] = str(d)
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(cache_dir: Path) -> None:
    """Every test uses a per-session cache folder, never the user's."""


@pytest.fixture(scope="session")
def slide_mpp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """Lossless 3-level pyramid (1, 4, 16) at 0.5 um/px, 1500 x 1100 px."""
    img = pattern(1500, 1100)
    path = tmp_path_factory.mktemp("slides") / "with_mpp.tif"
    write_pyramid_from_array(path, img, 0.5, downsamples=(1, 4, 16), compression="zlib")
    return path, img


@pytest.fixture(scope="session")
def slide_no_mpp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """JPEG pyramid with no resolution tags."""
    img = pattern(1200, 900, seed=1)
    path = tmp_path_factory.mktemp("slides") / "no_mpp.tif"
    write_pyramid_from_array(path, img, None, downsamples=(1, 4))
    return path, img


@pytest.fixture(scope="session")
def slide_npot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """Non-power-of-two downsamples (1, 3, 9), lossless."""
    img = pattern(1350, 999, seed=2)
    path = tmp_path_factory.mktemp("slides") / "npot.tif"
    write_pyramid_from_array(path, img, 0.25, downsamples=(1, 3, 9), compression="zlib")
    return path, img


def need_patches() -> Path:
    if not PATCHES.is_dir():
        pytest.skip(f"real IDC patches not found at {PATCHES}")
    return PATCHES
