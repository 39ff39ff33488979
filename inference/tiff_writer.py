"""Write tiled pyramidal TIFFs that OpenSlide reads as generic tiled TIFF, MPP included."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from inference.atomic import atomic_path
from inference.slide import resize_rgb

#: tile_fn(downsample, x_lv, y_lv, w_lv, h_lv) -> RGB uint8 (h_lv, w_lv, 3) of that level.
TileFn = Callable[[float, int, int, int, int], np.ndarray]


def write_pyramid(
    path: str | os.PathLike[str],
    size_l0: tuple[int, int],
    tile_fn: TileFn,
    mpp: float | None,
    downsamples: Sequence[float] = (1, 4, 16),
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    description: str = "",
    ycbcr: bool = False,
) -> Path:
    """Write a pyramid level by level, tile by tile, never holding a whole level in memory.

    ``size_l0`` is (w, h) in level-0 pixels. The file is written next to ``path`` and renamed
    into place, so a crash never leaves a half-written slide behind. ``ycbcr`` stores JPEG tiles
    as YCbCr with 4:2:0 chroma subsampling, as scanners do (otherwise RGB, full chroma).
    """
    path = Path(path)
    w0, h0 = size_l0
    comp_args = {"level": quality} if compression == "jpeg" else None
    colour = {"photometric": "ycbcr", "subsampling": (2, 2)} if ycbcr and compression == "jpeg" else {"photometric": "rgb"}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=w0 * h0 * 3 > 2**31) as tif:
        for i, ds in enumerate(downsamples):
            w_lv, h_lv = max(1, math.ceil(w0 / ds)), max(1, math.ceil(h0 / ds))
            extra = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * ds)
                extra = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                _tiles(tile_fn, ds, w_lv, h_lv, tile, to_ycbcr="subsampling" in colour),
                shape=(h_lv, w_lv, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                **colour,
                compression=compression,
                compressionargs=comp_args,
                subfiletype=1 if i else 0,
                description=description if i == 0 else None,
                metadata=None,
                **extra,
            )
    return path


def _tiles(tile_fn: TileFn, ds: float, w_lv: int, h_lv: int, tile: int, to_ycbcr: bool = False) -> Iterator[np.ndarray]:
    """Tiles in TIFF order; tifffile's JPEG encoder takes YCbCr tiles as they are, so convert first."""
    for y in range(0, h_lv, tile):
        for x in range(0, w_lv, tile):
            tw, th = min(tile, w_lv - x), min(tile, h_lv - y)
            out = np.full((tile, tile, 3), 255, np.uint8)
            out[:th, :tw] = tile_fn(ds, x, y, tw, th)
            yield np.asarray(Image.fromarray(out).convert("YCbCr")) if to_ycbcr else out


def array_tile_fn(image: np.ndarray) -> TileFn:
    """A tile function over an in-memory level-0 RGB array; coarser levels are box-filtered."""
    cache: dict[float, np.ndarray] = {1.0: image}

    def fn(ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        if ds not in cache:
            h0, w0 = image.shape[:2]
            cache[ds] = resize_rgb(image, (max(1, math.ceil(w0 / ds)), max(1, math.ceil(h0 / ds))))
        return cache[ds][y : y + h, x : x + w]

    return fn


def write_pyramid_from_array(
    path: str | os.PathLike[str], image: np.ndarray, mpp: float | None, **kwargs: object
) -> Path:
    """Write an in-memory RGB array (h, w, 3) as a pyramidal TIFF."""
    h, w = image.shape[:2]
    return write_pyramid(path, (w, h), array_tile_fn(image), mpp, **kwargs)  # type: ignore[arg-type]
