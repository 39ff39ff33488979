"""Fixtures of real patches laid out as slides, for the field-of-view and ensemble tests."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.model import LoadedModel
from inference.predict import PredictSettings, plan, predict_slide
from inference.slide import open_slide
from tests.conftest import need_patches
from training.data import POS_RE, find_patch_files
from training.rebuild import rebuild_slides

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
    return link_patients(tmp_path_factory.mktemp("few"), 12)


def link_patients(out: Path, first: int, extra: Iterable[str] = ()) -> Path:
    """``out`` made a folder of links to the first ``first`` real patients (by name, patient 8975
    left out) and to the ``extra`` ones."""
    root = need_patches()
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "8975")[:first]
    for name in sorted({*names, *extra}):
        (out / name).symlink_to(root / name, target_is_directory=True)
    return out


def grid_cells(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Grid (rows, cols) of the patches in the order load_folder gives them (by file name)."""
    pos = [(int(m["y"]) // 50, int(m["x"]) // 50) for f, _, _ in find_patch_files(root) if (m := POS_RE.search(f.name))]
    return np.array([r for r, _ in pos]), np.array([c for _, c in pos])


def assert_scores_every_cell_where_it_is(root: Path, model: LoadedModel, expected: np.ndarray, out: Path) -> None:
    """The heatmap of ``root``'s rebuilt lossless slide holds, in each patch's cell, ``expected``
    (one probability per patch, in load_folder's order), and a one-cell shift would show."""
    (rs,) = rebuild_slides(root, out, quality=None)
    with open_slide(rs.path) as slide:
        hm = plan(slide, model, PredictSettings(batch_size=8, first_batch=3))
        assert hm.grid.patch_shape == (ROWS, COLS)
        list(predict_slide(slide, model, hm))
    got = hm.patch_prob[grid_cells(root)]
    done = np.isfinite(got)
    assert done.sum() >= 18 and np.ptp(expected) > 1e-3
    np.testing.assert_allclose(got[done], expected[done], atol=1e-5)
    assert np.abs(got[done] - np.roll(expected[done], 1)).max() > 1e-3
