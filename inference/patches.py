"""The patch grid: model-sized patches at the model's resolution, laid on level 0 from the origin."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
