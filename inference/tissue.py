"""Tissue detection at low resolution: Otsu's threshold on saturation."""

from __future__ import annotations

import math

import numpy as np

from inference.patches import PatchGrid
from inference.slide import Slide

#: Pixels of the low-resolution image per patch side.
PX_PER_PATCH = 8
#: A patch is computed when at least this share of it is tissue.
#: Edge patches need at least this share of their area on the slide.
MIN_ON_SLIDE = 0.25
MIN_TISSUE = 0.1


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    w0 = np.cumsum(hist)
    m = np.cumsum(hist * np.arange(256))
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m[-1] * w0 / total - m) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    return float(np.argmax(between))


def tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB image (saturated and not too dark)."""
    mx = rgb.max(axis=2).astype(np.int16)
    mn = rgb.min(axis=2).astype(np.int16)
    sat = ((mx - mn) * 255 // np.maximum(mx, 1)).astype(np.uint8)
    # Otsu separates glass from stain; clamped so an empty slide finds no tissue (floor) and a
    # slide that is all tissue does not lose its pale stroma to the purple nuclei (ceiling).
    thr = min(max(otsu(sat), 15.0), 45.0)
    return (sat > thr) & (mx > 30)


def patch_tissue(slide: Slide, grid: PatchGrid, min_tissue: float = MIN_TISSUE) -> np.ndarray:
    """Boolean (rows, cols) over the patch grid: True where a patch holds enough tissue."""
    rows, cols = grid.patch_shape
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols), bool)
    px = PX_PER_PATCH / grid.k  # low-res pixels per stride
    # Read the area covered by the stride grid so each stride square is exactly px x px.
    w_cells, h_cells = cols + grid.k - 1, rows + grid.k - 1
    out_w, out_h = round(w_cells * px), round(h_cells * px)
    box = grid.cell_block_box(0, 0, h_cells, w_cells)
    rgb = slide.read_box(box, (max(1, out_w), max(1, out_h)))
    mask = tissue_pixels(rgb).astype(np.float32)
    # Edge patches reach past the slide: their share of tissue is taken over the part on the slide.
    on_slide = np.zeros(mask.shape, np.float32)
    w_px = math.ceil(grid.slide_w_l0 / grid.stride_l0 * px)
    h_px = math.ceil(grid.slide_h_l0 / grid.stride_l0 * px)
    on_slide[:h_px, :w_px] = 1
    ys = np.round(np.arange(rows) * px).astype(int)
    xs = np.round(np.arange(cols) * px).astype(int)
    y1 = np.minimum(ys + PX_PER_PATCH, mask.shape[0])
    x1 = np.minimum(xs + PX_PER_PATCH, mask.shape[1])
    tissue = _window_sums(mask, ys, y1, xs, x1)
    area = _window_sums(on_slide, ys, y1, xs, x1)
    # A patch mostly outside the slide shows the model too little tissue to judge: skip it.
    enough_slide = area >= MIN_ON_SLIDE * PX_PER_PATCH * PX_PER_PATCH
    return ((tissue / np.maximum(area, 1)) >= min_tissue) & enough_slide


def _window_sums(a: np.ndarray, ys: np.ndarray, y1: np.ndarray, xs: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """Sums of ``a`` over the windows [ys, y1) x [xs, x1), by an integral image."""
    integral = np.pad(a.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return (integral[y1[:, None], x1[None, :]] - integral[ys[:, None], x1[None, :]]
            - integral[y1[:, None], xs[None, :]] + integral[ys[:, None], xs[None, :]])
