"""Rectangles and pyramid maths: the only module that converts between coordinate frames.

Frames used across the project:

* level-0 pixels (``*_l0``): full-resolution slide pixels; everything stored uses them.
* level pixels (``*_lv``): pixels of one pyramid level, ``l0 / downsample``.
* grid cells (``(row, col)``): cells of a regular grid laid on level 0 from the origin.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rect:
    """An axis-aligned rectangle in level-0 pixels (integer corners)."""

    x: int
    y: int
    w: int
    h: int

    @property
    def right(self) -> int:
        return self.x + self.w

    @property
    def bottom(self) -> int:
        return self.y + self.h

    @property
    def is_empty(self) -> bool:
        return self.w <= 0 or self.h <= 0

    @classmethod
    def from_corners(cls, x0: float, y0: float, x1: float, y1: float) -> Rect:
        """Build from corners in level-0 pixels, rounding each corner independently."""
        ix0, iy0, ix1, iy1 = round(x0), round(y0), round(x1), round(y1)
        return cls(ix0, iy0, max(0, ix1 - ix0), max(0, iy1 - iy0))

    def intersect(self, other: Rect) -> Rect:
        """Intersection with another level-0 rectangle (empty if disjoint)."""
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1, y1 = min(self.right, other.right), min(self.bottom, other.bottom)
        return Rect(x0, y0, max(0, x1 - x0), max(0, y1 - y0))


def best_level(downsamples: Sequence[float], downsample: float) -> int:
    """Index of the coarsest pyramid level that is at least as fine as ``downsample``."""
    best = 0
    for i, ds in enumerate(downsamples):
        if ds <= downsample * 1.01 and ds >= downsamples[best]:  # a 1% upscale is invisible
            best = i
    return best


def to_level(rect_l0: Rect, downsample: float) -> tuple[int, int, int, int]:
    """Level-0 rectangle -> (x_lv, y_lv, w_lv, h_lv) covering it at ``downsample``.

    Corners are floored/ceiled outward so the level region always covers the request.
    """
    x0 = math.floor(rect_l0.x / downsample)
    y0 = math.floor(rect_l0.y / downsample)
    x1 = math.ceil(rect_l0.right / downsample - 1e-9)
    y1 = math.ceil(rect_l0.bottom / downsample - 1e-9)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def display_downsamples(width_l0: int, height_l0: int, tile: int = 256) -> list[float]:
    """Power-of-two display pyramid, from 1 to the first level fitting in one tile."""
    out = [1.0]
    while max(width_l0, height_l0) / out[-1] > tile:
        out.append(out[-1] * 2)
    return out


def strided_cell_rect(row: int, col: int, stride_l0: float, cell_l0: float) -> Rect:
    """Level-0 rectangle of the cell at (row, col) of a strided grid from the origin."""
    x0, y0 = col * stride_l0, row * stride_l0
    return Rect.from_corners(x0, y0, x0 + cell_l0, y0 + cell_l0)


def tiles_in_view(
    view_l0: Rect, tile_l0: float, n_cols: int, n_rows: int
) -> Iterator[tuple[int, int]]:
    """(row, col) of the tiles of size ``tile_l0`` (level-0 px) that intersect ``view_l0``."""
    c0 = max(0, math.floor(view_l0.x / tile_l0))
    r0 = max(0, math.floor(view_l0.y / tile_l0))
    c1 = min(n_cols - 1, math.floor((view_l0.right - 1) / tile_l0))
    r1 = min(n_rows - 1, math.floor((view_l0.bottom - 1) / tile_l0))
    for row in range(r0, r1 + 1):
        for col in range(c0, c1 + 1):
            yield row, col
