"""Fixtures of real patches laid out as slides, for the field-of-view and ensemble tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import need_patches
from training.data import POS_RE, find_patch_files

ROWS, COLS = 5, 6


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[tuple[int, int], int]]:
    """Real patches of both classes renamed onto a 5 x 6 grid of one patient, with gaps (white)."""
    root = need_patches()
    with open(root / "manifest.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["width"] == "50" and r["height"] == "50" and r["patient_id"] != "8975"]
    rng = np.random.default_rng(4)
    pick = [rows[i] for i in rng.choice(len(rows), 22, replace=False)]
    # The last cell holds a patch, so the rebuilt slide spans the whole 5 x 6 grid.
    cells = [ROWS * COLS - 1, *rng.choice(ROWS * COLS - 1, len(pick) - 1, replace=False)]
    out = tmp_path_factory.mktemp("layout") / "p1" / "0"
    out.mkdir(parents=True)
    placed = {}
    for r_, cell in zip(pick, cells, strict=True):
        r, c = divmod(int(cell), COLS)
        with Image.open(root / r_["path"]) as img:
            img.convert("RGB").save(out / f"p1_idx5_x{c * 50}_y{r * 50}_class{r_['label']}.png")
        placed[(r, c)] = int(r_["label"])
    return out.parent.parent, placed


@pytest.fixture(scope="module")
def few_patients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 12 real patients' patches (links), so that margin loads read only those."""
    root = need_patches()
    out = tmp_path_factory.mktemp("few")
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "8975")[:12]:
        (out / d.name).symlink_to(d, target_is_directory=True)
    return out


def grid_cells(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Grid (rows, cols) of the patches in the order load_folder gives them (by file name)."""
    pos = [(int(m["y"]) // 50, int(m["x"]) // 50) for f, _, _ in find_patch_files(root) if (m := POS_RE.search(f.name))]
    return np.array([r for r, _ in pos]), np.array([c for _, c in pos])
