"""The patch grid: model-sized patches at the model's resolution, laid on level 0 from the origin."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from inference.errors import UserError
from inference.geometry import Rect, strided_cell_rect


class GridError(UserError, ValueError):
    """The requested grid cannot be built; one sentence for the user."""


@dataclass(frozen=True)
class PatchGrid:
    """Patches of ``patch_px`` model pixels every ``stride_px`` model pixels.

    One model pixel is ``model_mpp`` um; one level-0 pixel is ``slide_mpp`` um. Patch (row, col)
    covers the level-0 box from (col, row) * stride_l0 with side patch_l0. Heatmap cells are the
    stride-sized squares of the same grid; patch (r, c) covers cells r..r+k-1, c..c+k-1 where
    k = patch_px / stride_px.
    """

    slide_w_l0: int
    slide_h_l0: int
    slide_mpp: float
    model_mpp: float
    patch_px: int
    stride_px: int

    @classmethod
    def build(cls, size_l0: tuple[int, int], slide_mpp: float | None, model_mpp: float,
              patch_px: int, stride_px: int | None = None) -> PatchGrid:
        if slide_mpp is None:
            raise GridError("The slide's resolution (MPP) is unknown; enter it before running the model.")
        stride_px = stride_px or patch_px
        if stride_px <= 0 or patch_px % stride_px:
            raise GridError(f"The stride ({stride_px} px) must divide the patch size ({patch_px} px).")
        return cls(size_l0[0], size_l0[1], float(slide_mpp), float(model_mpp), patch_px, stride_px)

    @property
    def scale(self) -> float:
        """Level-0 pixels per model pixel."""
        return self.model_mpp / self.slide_mpp

    @property
    def patch_l0(self) -> float:
        return self.patch_px * self.scale

    @property
    def stride_l0(self) -> float:
        return self.stride_px * self.scale

    @property
    def k(self) -> int:
        """Heatmap cells per patch side."""
        return self.patch_px // self.stride_px

    @property
    def patch_shape(self) -> tuple[int, int]:
        """(rows, cols) of patches: enough that every cell overlapping the slide is covered.

        Patches at the right and bottom edges may reach past the slide; the reader pads the
        outside with the slide's background colour, so edge strips are computed too.
        """
        def n(extent_l0: int) -> int:
            cells = math.ceil(extent_l0 / self.stride_l0 - 1e-9) if extent_l0 > 0 else 0
            return max(1, cells - self.k + 1) if cells else 0

        return n(self.slide_h_l0), n(self.slide_w_l0)

    @property
    def cell_shape(self) -> tuple[int, int]:
        """(rows, cols) of heatmap cells (stride squares covered by at least one patch)."""
        rows, cols = self.patch_shape
        if rows == 0 or cols == 0:
            return 0, 0
        return rows + self.k - 1, cols + self.k - 1

    def patch_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Exact level-0 box (x0, y0, x1, y1) the model sees for patch (row, col)."""
        x0, y0 = col * self.stride_l0, row * self.stride_l0
        return x0, y0, x0 + self.patch_l0, y0 + self.patch_l0

    def patch_rect(self, row: int, col: int) -> Rect:
        """Level-0 rectangle of patch (row, col), corners rounded independently."""
        return strided_cell_rect(row, col, self.stride_l0, self.patch_l0)

    def cell_rect(self, row: int, col: int) -> Rect:
        """Level-0 rectangle of heatmap cell (row, col)."""
        return strided_cell_rect(row, col, self.stride_l0, self.stride_l0)

    def cell_at(self, x_l0: float, y_l0: float) -> tuple[int, int] | None:
        """(row, col) of the heatmap cell containing a level-0 point, or None outside."""
        rows, cols = self.cell_shape
        r, c = math.floor(y_l0 / self.stride_l0), math.floor(x_l0 / self.stride_l0)
        return (r, c) if 0 <= r < rows and 0 <= c < cols else None

    # -- vectorised cell maths: the one owner of cell <-> level-0 conversions ------------------
    def cell_index(self, v_l0: np.ndarray) -> np.ndarray:
        """Row (or column) index of the cells containing level-0 coordinates ``v_l0`` (unclipped)."""
        return np.floor(np.asarray(v_l0, np.float64) / self.stride_l0).astype(np.int64)

    def cell_block_box(self, r0: int, c0: int, r1: int, c1: int) -> tuple[float, float, float, float]:
        """Level-0 box (x0, y0, x1, y1) of the cell block rows r0..r1-1, cols c0..c1-1."""
        s = self.stride_l0
        return c0 * s, r0 * s, c1 * s, r1 * s

    def cell_boxes(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Shapely boxes (level-0) of heatmap cells."""
        s = self.stride_l0
        return shapely.box(cols * s, rows * s, (cols + 1) * s, (rows + 1) * s)

    def patch_boxes(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Shapely boxes (level-0) of patches: what the model saw."""
        s, p = self.stride_l0, self.patch_l0
        return shapely.box(cols * s, rows * s, cols * s + p, rows * s + p)

    def cells_with_centre_in(self, geom: BaseGeometry) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of the heatmap cells whose centre lies inside a level-0 geometry."""
        _, rr, cc = self.cells_with_centre_in_each([geom])
        return rr, cc

    def cells_with_centre_in_each(self, geoms: Sequence[BaseGeometry]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(index into ``geoms``, row, col) of every heatmap cell whose centre lies inside one of
        the level-0 geometries (a centre on an edge is outside). Only the cells of each
        geometry's bounds are tested, all in one vectorised call: a labels file may hold a
        region per patch."""
        arr = np.empty(len(geoms), dtype=object)
        arr[:] = list(geoms)
        n_rows, n_cols = self.cell_shape
        s = self.stride_l0
        minx, miny, maxx, maxy = np.nan_to_num(shapely.bounds(arr)).T  # an empty geometry: NaN
        c0 = np.clip(np.floor(minx / s - 0.5), 0, n_cols).astype(np.int64)
        c1 = np.clip(np.ceil(maxx / s - 0.5) + 1, 0, n_cols).astype(np.int64)
        r0 = np.clip(np.floor(miny / s - 0.5), 0, n_rows).astype(np.int64)
        r1 = np.clip(np.ceil(maxy / s - 0.5) + 1, 0, n_rows).astype(np.int64)
        w = np.maximum(c1 - c0, 0)
        n = w * np.maximum(r1 - r0, 0)
        region = np.repeat(np.arange(len(arr)), n)
        k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # index inside each box
        rr = r0[region] + k // w[region]
        cc = c0[region] + k % w[region]
        inside = shapely.contains_xy(arr[region], (cc + 0.5) * s, (rr + 0.5) * s)
        return region[inside], rr[inside], cc[inside]

    def patches_touching(self, bounds_l0: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of every patch whose box may overlap the level-0 bounds (x0, y0, x1, y1)."""
        n_rows, n_cols = self.patch_shape
        minx, miny, maxx, maxy = bounds_l0
        s, p = self.stride_l0, self.patch_l0
        c0, r0 = max(0, math.floor((minx - p) / s)), max(0, math.floor((miny - p) / s))
        c1, r1 = min(n_cols - 1, math.ceil(maxx / s)), min(n_rows - 1, math.ceil(maxy / s))
        if c1 < c0 or r1 < r0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        rr, cc = np.mgrid[r0 : r1 + 1, c0 : c1 + 1]
        return rr.ravel(), cc.ravel()


def centre(images: np.ndarray, margin: int) -> np.ndarray:
    """The patches in the middle of (n, p + 2m, p + 2m, 3) inputs cut with ``margin`` m around them."""
    if margin == 0:
        return images
    return images[:, margin:-margin, margin:-margin]
