from __future__ import annotations

import pytest

from inference.geometry import (
    Rect,
    best_level,
    strided_cell_rect,
    tiles_in_view,
    to_level,
)
from inference.tiles import ByteLRU, TileGrid, TileKey


def test_rect_intersection_and_corners() -> None:
    a = Rect(0, 0, 100, 50)
    assert a.intersect(Rect(90, 40, 20, 20)) == Rect(90, 40, 10, 10)
    assert a.intersect(Rect(200, 0, 5, 5)).is_empty
    assert Rect.from_corners(0.4, 0.6, 10.5, 9.4) == Rect(0, 1, 10, 8)


@pytest.mark.parametrize(
    ("downsamples", "ds", "expected"),
    [((1, 4, 16), 1, 0), ((1, 4, 16), 3.9, 0), ((1, 4, 16), 4, 1), ((1, 4, 16), 100, 2),
     ((1, 3, 9), 5, 1), ((1, 3, 9), 0.5, 0), ((1.0, 2.0001, 4.0003), 2, 1)],
)
def test_best_level_is_coarsest_at_least_as_fine(downsamples: tuple[float, ...], ds: float, expected: int) -> None:
    assert best_level(downsamples, ds) == expected


def test_to_level_covers_the_request() -> None:
    x, y, w, h = to_level(Rect(5, 7, 10, 10), 4)
    assert (x, y) == (1, 1)
    assert x * 4 <= 5 and (x + w) * 4 >= 15 and (y + h) * 4 >= 17


def test_neighbouring_tiles_share_edges_exactly() -> None:
    grid = TileGrid("s", (10_001, 7_777), tile=256)
    for level in range(grid.coarsest + 1):
        rows, cols = grid.shape(level)
        covered = 0
        for r in range(rows):
            for c in range(cols):
                rect = grid.rect(TileKey("s", level, r, c))
                covered += rect.w * rect.h
                if c + 1 < cols:
                    assert grid.rect(TileKey("s", level, r, c + 1)).x == rect.right
                if r + 1 < rows:
                    assert grid.rect(TileKey("s", level, r + 1, c)).y == rect.bottom
        assert covered == 10_001 * 7_777  # tiles tile the slide, no gap, no overlap


def test_level_for_scale_and_parent() -> None:
    grid = TileGrid("s", (100_000, 80_000))
    assert grid.level_for_scale(1.0) == 0
    assert grid.level_for_scale(0.5) == 1
    assert grid.level_for_scale(0.3) == 1  # 1/0.3 = 3.3: level 1 (ds 2) is the coarsest fine enough
    assert grid.level_for_scale(1e-6) == grid.coarsest
    assert grid.parent(TileKey("s", 0, 5, 9), 2) == TileKey("s", 2, 1, 2)


def test_visible_tiles_centre_first() -> None:
    grid = TileGrid("s", (4096, 4096))
    keys = grid.visible(0, Rect(1000, 1000, 600, 600))
    assert {(k.row, k.col) for k in keys} == {(r, c) for r in range(3, 7) for c in range(3, 7)}
    assert (keys[0].row, keys[0].col) in {(4, 4), (4, 5), (5, 4), (5, 5)}
    assert list(tiles_in_view(Rect(-500, -500, 100, 100), 256, 4, 4)) == []


def test_strided_grid_covers_the_edges() -> None:
    from inference.patches import PatchGrid

    def shape(w: int, h: int, stride: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
        g = PatchGrid.build((w, h), 1.0, 1.0, 100, stride)
        return g.patch_shape, g.cell_shape

    assert shape(1000, 500) == ((5, 10), (5, 10))  # exact multiples: no partial cells
    assert shape(1050, 520) == ((6, 11), (6, 11))  # partial right and bottom strips are cells too
    assert shape(1000, 500, 50) == ((9, 19), (10, 20))  # half-overlapping patches
    assert shape(1010, 500, 50) == ((9, 20), (10, 21))
    assert shape(99, 40) == ((1, 1), (1, 1))  # smaller than one patch: one padded patch
    assert strided_cell_rect(2, 3, 12.5, 25) == Rect(38, 25, 24, 25)


def test_byte_lru_evicts_least_recent_by_bytes() -> None:
    cache: ByteLRU[bytes] = ByteLRU(10, len)
    cache.put("a", b"xxxx")
    cache.put("b", b"xxxx")
    assert cache.get("a") == b"xxxx"  # a is now most recent
    cache.put("c", b"xxxx")
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.nbytes == 8
