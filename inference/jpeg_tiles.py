"""Direct decoding of a TIFF pyramid's JPEG tiles, at full or reduced (DCT) scale.

Aperio SVS and generic tiled TIFF, most of the slides a lab meets, keep each pyramid level as
JPEG tiles. OpenSlide decodes a tile in full and paints it through cairo; decoding the same
stream with Pillow (libjpeg-turbo) gives the same pixels in a fraction of the time, and libjpeg
can also decode at 1/2, 1/4 or 1/8 of the size by running a smaller inverse DCT. That is what a
view between two pyramid levels needs: at half the finer level's size it no longer decodes four
level pixels per screen pixel and throws three away.

:func:`open_jpeg_levels` accepts a file only when every OpenSlide level is one tiled, 8-bit RGB
or YCbCr JPEG page of exactly that level's size, and when its first tile of every level decodes
to OpenSlide's pixels; anything else (other formats, other compressions, a colour space libjpeg
would read otherwise) is left to OpenSlide.

Reads are in a level's own pixel grid. Where a level's downsample is not whole (4.0003 in many
scans), OpenSlide, given a level-0 position, starts its read a fraction of a pixel off that grid
and interpolates; here the level's pixels are returned as they are.
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from inference.tiles import ByteLRU

if TYPE_CHECKING:
    from tifffile import TiffPage

log = logging.getLogger(__name__)

#: The reduced scales libjpeg decodes at (1: full size).
SCALES = (1, 2, 4, 8)
#: OpenSlide vendors whose levels are TIFF pages as they are in the file.
VENDORS = ("aperio", "generic-tiff")
#: Decoded tiles kept for reads that share them (tiles not aligned to the reads, neighbours).
CACHE_BYTES = 64 << 20
_JPEG, _RGB, _YCBCR = 7, 2, 6


class TileDecodeError(Exception):
    """A tile's bytes are not a JPEG stream libjpeg can decode."""


def _adobe_marker(transform: int) -> bytes:
    """An APP14 'Adobe' segment telling libjpeg the components' colour space (0: RGB, 1: YCbCr).

    A TIFF's photometric tag, not the JPEG stream, says how the tiles are coded; OpenSlide reads
    the tag, and this marker makes libjpeg do the same.
    """
    body = b"Adobe" + (100).to_bytes(2, "big") + bytes(4) + bytes([transform])
    return b"\xff\xee" + (len(body) + 2).to_bytes(2, "big") + body


@dataclass(frozen=True)
class _Level:
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray  # of each tile's bytes in the file, row by row
    counts: np.ndarray
    header: bytes  # SOI, the colour-space marker and the shared tables, if any
    cols: int


class JpegLevels:
    """The JPEG tiles of a slide's levels, read with one file descriptor (``os.pread``, so any
    number of threads may read at once) and decoded with Pillow."""

    def __init__(self, path: Path, levels: Sequence[_Level]) -> None:
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.levels = tuple(levels)
        self._cache: ByteLRU[np.ndarray | None] = ByteLRU(CACHE_BYTES, lambda a: 64 if a is None else a.nbytes)
        self._closed = threading.Event()

    def _tile(self, level: int, index: int, scale: int) -> np.ndarray | None:
        """RGB (tile_h / scale, tile_w / scale, 3) of one tile; None where the file has none."""
        key = (level, index, scale)
        hit = self._cache.get(key)
        if hit is not None or key in self._cache:
            return hit
        lv = self.levels[level]
        count = int(lv.counts[index])
        if count == 0:
            self._cache.put(key, None)
            return None
        data = os.pread(self._fd, count, int(lv.offsets[index]))
        if data[:2] != b"\xff\xd8":
            raise TileDecodeError(f"tile {index} of level {level} is not a JPEG stream")
        size = (lv.tile_w // scale, lv.tile_h // scale)
        try:
            with Image.open(io.BytesIO(lv.header + data[2:]), formats=("JPEG",)) as img:
                if scale > 1:
                    img.draft("RGB", size)
                rgb = np.asarray(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            raise TileDecodeError(f"tile {index} of level {level} cannot be decoded: {exc}") from exc
        if rgb.shape[:2] != (size[1], size[0]):
            raise TileDecodeError(f"tile {index} of level {level} decoded to {rgb.shape[1]} x {rgb.shape[0]} px")
        self._cache.put(key, rgb)
        return rgb

    def read(self, level: int, x: int, y: int, w: int, h: int, scale: int = 1) -> np.ndarray:
        """(h, w, 4) RGBA of ``level`` reduced ``scale`` times, from pixel (x, y) of that reduced
        level; outside the level (or a tile the file lacks) is transparent, as in OpenSlide. Where
        every pixel is the slide's, (h, w, 3) RGB: nothing to composite."""
        lv = self.levels[level]
        tw, th = lv.tile_w // scale, lv.tile_h // scale
        width, height = math.ceil(lv.width / scale), math.ceil(lv.height / scale)
        out = np.zeros((h, w, 3), np.uint8)
        alpha = np.zeros((h, w), np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, width), min(y + h, height)
        for ty in range(y0 // th, (y1 - 1) // th + 1 if y1 > y0 else 0):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1 if x1 > x0 else 0):
                rgb = self._tile(level, ty * lv.cols + tx, scale)
                if rgb is None:
                    continue
                # The part of this tile inside both the request and the level.
                ax0, ay0 = max(x0, tx * tw), max(y0, ty * th)
                ax1, ay1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = rgb[ay0 - ty * th : ay1 - ty * th, ax0 - tx * tw : ax1 - tx * tw]
                alpha[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = 255
        return out if alpha.all() else np.dstack((out, alpha))

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            os.close(self._fd)
            self._cache.clear()


def _level_of_page(p: TiffPage, size: tuple[int, int]) -> _Level | None:
    """A level's tiles if ``p`` is a tiled 8-bit RGB / YCbCr JPEG page of ``size``."""
    ok = (
        p.is_tiled
        and (p.imagewidth, p.imagelength) == size
        and p.compression == _JPEG
        and p.photometric in (_RGB, _YCBCR)
        and p.samplesperpixel == 3 and p.bitspersample == 8
        and p.planarconfig == 1 and p.imagedepth == 1
        and p.tilewidth % 16 == 0 and p.tilelength % 16 == 0
    )
    if not ok:
        return None
    cols, rows = math.ceil(size[0] / p.tilewidth), math.ceil(size[1] / p.tilelength)
    if len(p.dataoffsets) != rows * cols:
        return None
    tables = p.jpegtables or b""
    if tables and not (tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9")):
        return None
    header = b"\xff\xd8" + _adobe_marker(0 if p.photometric == _RGB else 1) + tables[2:-2]
    return _Level(size[0], size[1], p.tilewidth, p.tilelength, np.asarray(p.dataoffsets, np.int64),
                  np.asarray(p.databytecounts, np.int64), header, cols)


#: reference(level, x_lv, y_lv, w, h) -> RGBA of OpenSlide's read of that level region.
Reference = Callable[[int, int, int, int, int], np.ndarray]


def open_jpeg_levels(path: Path, vendor: str, level_dimensions: Sequence[tuple[int, int]],
                     reference: Reference) -> JpegLevels | None:
    """Direct JPEG tile access to the slide's levels, or None where OpenSlide must decode."""
    if vendor not in VENDORS:
        return None
    try:
        import tifffile  # here: plain images and other formats never need it (100 ms to import)

        with tifffile.TiffFile(path) as tif:
            pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage) and p.is_tiled]
            levels = []
            for size in level_dimensions:
                found = [lv for lv in (_level_of_page(p, tuple(size)) for p in pages) if lv is not None]
                if len(found) != 1:
                    return None
                levels.append(found[0])
    except Exception:  # noqa: BLE001 - any doubt about the file leaves it to OpenSlide
        log.debug("no direct JPEG access to %s", path, exc_info=True)
        return None
    reader = JpegLevels(path, levels)
    try:
        for i, lv in enumerate(levels):
            w, h = min(lv.tile_w, lv.width), min(lv.tile_h, lv.height)
            ours = reader.read(i, 0, 0, w, h)
            if ours.shape[2] == 3:
                ours = np.dstack((ours, np.full((h, w), 255, np.uint8)))
            ours = ours.astype(np.int16)
            theirs = np.asarray(reference(i, 0, 0, w, h)).astype(np.int16)
            if ours.shape != theirs.shape or np.abs(ours - theirs).max() > 2:
                log.info("%s: level %d decodes unlike OpenSlide; OpenSlide reads this slide", path.name, i)
                reader.close()
                return None
    except Exception:  # noqa: BLE001
        log.debug("direct JPEG check failed for %s", path, exc_info=True)
        reader.close()
        return None
    return reader
