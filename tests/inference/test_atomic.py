"""The one atomic writer: old or new content, never half, and no temporary file left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.atomic import atomic_path, write_bytes


def test_replaces_whole_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.geojson"
    write_bytes(target, b"old")
    write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["a.geojson"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.csv"
    write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.csv"]


def test_temporary_name_keeps_the_format_suffix(tmp_path: Path) -> None:
    target = tmp_path / "x.heatmap.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png"
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp)
    assert Image.open(target).size == (4, 4)
