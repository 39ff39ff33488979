"""Headless slide access: OpenSlide formats and plain images behind one small API.

``Slide.read(rect_l0, size)`` returns RGB uint8 for any level-0 rectangle at any output size,
choosing the pyramid level, reading, compositing over the background colour and resizing.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from inference.errors import UserError
from inference.geometry import Rect, best_level, to_level
from inference.jpeg_tiles import SCALES, JpegLevels, TileDecodeError, open_jpeg_levels

log = logging.getLogger(__name__)

#: Above this many level-0 pixels per side a file is treated as corrupt, not as a slide.
MAX_SIDE_L0 = 2_000_000
#: Plain images are decoded whole; refuse ones that would not fit in memory comfortably.
MAX_PLAIN_PIXELS = 400_000_000
PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
#: Every file suffix the viewer opens: OpenSlide's formats and plain images.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                  ".dcm", *sorted(PLAIN_SUFFIXES))


class SlideError(UserError):
    """A slide could not be opened or read; the message is one sentence for the user."""


@dataclass(frozen=True)
class SlideInfo:
    """Immutable description of an open slide (all sizes in pixels of the named level)."""

    path: Path
    vendor: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_from_file: bool
    objective_power: float | None
    background: tuple[int, int, int]
    associated: tuple[str, ...]
    properties: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


def _parse_float(value: str | None) -> float | None:
    try:
        out = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and np.isfinite(out) and out > 0 else None


def _parse_colour(value: str | None) -> tuple[int, int, int]:
    try:
        v = int(str(value), 16)
        return (v >> 16) & 255, (v >> 8) & 255, v & 255
    except (TypeError, ValueError):
        return 255, 255, 255


def composite_rgba(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Composite a non-premultiplied RGBA uint8 array over an opaque background colour."""
    if rgba.shape[2] == 3:
        return rgba
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16)
    out = (rgba[..., :3].astype(np.uint16) * a + bg * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def resize_rgb(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 array to ``size`` = (w, h) with area/bilinear filtering."""
    w, h = size
    if arr.shape[1] == w and arr.shape[0] == h:
        return arr
    img = Image.fromarray(arr)
    shrinking = w < arr.shape[1] and h < arr.shape[0]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(img.resize((w, h), resample, reducing_gap=None if not shrinking else 2.0))


class _Backend:
    """What a slide format must provide."""

    def read_level(self, level: int, x_lv: int, y_lv: int, w_lv: int, h_lv: int, scale: int = 1) -> np.ndarray:
        """RGBA (h_lv, w_lv, 4) of ``level`` reduced ``scale`` times (one of :meth:`scales`), from
        pixel (x_lv, y_lv) of that reduced level; outside the slide is transparent. A backend may
        return RGB (h_lv, w_lv, 3) where every pixel is opaque."""
        raise NotImplementedError

    def scales(self, level: int) -> tuple[int, ...]:
        """The reductions :meth:`read_level` can decode a level at directly (1: as stored)."""
        return (1,)

    def associated_image(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles."""


class _OpenSlideBackend(_Backend):
    def __init__(self, path: Path, direct_jpeg: bool = True) -> None:
        import openslide

        self._os = openslide
        try:
            self.osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(f"{path.name} is not a slide or image format this app can read.") from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{path.name} is damaged or incomplete and cannot be opened.") from exc
        # SVS and generic TIFF: their JPEG tiles decoded directly, faster and at reduced scales.
        self.jpeg: JpegLevels | None = open_jpeg_levels(
            path, self.osr.properties.get("openslide.vendor", ""), self.osr.level_dimensions,
            self._read_openslide) if direct_jpeg else None

    def _read_openslide(self, level: int, x_lv: int, y_lv: int, w_lv: int, h_lv: int) -> np.ndarray:
        ds = self.osr.level_downsamples[level]
        try:
            img = self.osr.read_region((round(x_lv * ds), round(y_lv * ds)), level, (w_lv, h_lv))
        except self._os.OpenSlideError as exc:
            raise SlideError("The slide file is damaged: a region could not be read.") from exc
        return np.asarray(img)

    def read_level(self, level: int, x_lv: int, y_lv: int, w_lv: int, h_lv: int, scale: int = 1) -> np.ndarray:
        if self.jpeg is None:
            if scale != 1:
                raise ValueError(f"OpenSlide cannot decode at 1/{scale} scale")
            return self._read_openslide(level, x_lv, y_lv, w_lv, h_lv)
        try:
            return self.jpeg.read(level, x_lv, y_lv, w_lv, h_lv, scale)
        except (TileDecodeError, OSError) as exc:
            raise SlideError("The slide file is damaged: a region could not be read.") from exc

    def scales(self, level: int) -> tuple[int, ...]:
        return SCALES if self.jpeg is not None else (1,)

    def associated_image(self, name: str) -> np.ndarray:
        return np.asarray(self.osr.associated_images[name].convert("RGB"))

    def close(self) -> None:
        if self.jpeg is not None:
            self.jpeg.close()
        self.osr.close()


class _PlainImageBackend(_Backend):
    """A PNG/JPEG/BMP held in memory with a small power-of-two pyramid built at open."""

    def __init__(self, path: Path) -> None:
        try:
            with Image.open(path) as img:
                if img.width * img.height > MAX_PLAIN_PIXELS:
                    raise SlideError(f"{path.name} is too large to open as a plain image.")
                img.load()
                rgb = img.convert("RGB")
        except SlideError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise SlideError(f"{path.name} is damaged or not an image this app can read.") from exc
        self.levels = [np.asarray(rgb)]
        while min(self.levels[-1].shape[:2]) > 512:
            prev = self.levels[-1]
            self.levels.append(resize_rgb(prev, (prev.shape[1] // 2, prev.shape[0] // 2)))

    def read_level(self, level: int, x_lv: int, y_lv: int, w_lv: int, h_lv: int, scale: int = 1) -> np.ndarray:
        if scale != 1:
            raise ValueError("plain images are read at their levels' own scale")
        arr = self.levels[level]
        out = np.zeros((h_lv, w_lv, 4), np.uint8)
        sx0, sy0 = max(0, x_lv), max(0, y_lv)
        sx1, sy1 = min(arr.shape[1], x_lv + w_lv), min(arr.shape[0], y_lv + h_lv)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y_lv : sy1 - y_lv, sx0 - x_lv : sx1 - x_lv, :3] = arr[sy0:sy1, sx0:sx1]
            out[sy0 - y_lv : sy1 - y_lv, sx0 - x_lv : sx1 - x_lv, 3] = 255
        return out


class _OpenFile:
    """Reads in flight and the closed flag of one open file (shared by :meth:`Slide.with_mpp` copies)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active = 0
        self.closed = False


class Slide:
    """An open slide. ``read`` is safe to call from several threads (OpenSlide is thread-safe,
    plain images are read-only arrays, JPEG tiles are read with ``os.pread``).

    ``direct_jpeg=False`` has OpenSlide decode every tile even where the file's JPEG tiles could
    be decoded directly (:mod:`inference.jpeg_tiles`): more slowly, and never at a reduced scale.
    """

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None, direct_jpeg: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise SlideError(f"{self.path} does not exist.")
        if self.path.is_dir():
            raise SlideError(f"{self.path} is a folder, not a slide file.")
        if self.path.stat().st_size == 0:
            raise SlideError(f"{self.path.name} is empty (0 bytes).")
        suffix = self.path.suffix.lower()
        self._fingerprint: str | None = None
        self._backend: _Backend
        self._file = _OpenFile()
        if suffix in PLAIN_SUFFIXES:
            self._backend = backend = _PlainImageBackend(self.path)
            level_dims = tuple((lv.shape[1], lv.shape[0]) for lv in backend.levels)
            props: dict[str, str] = {"openslide.vendor": "image"}
        else:
            self._backend = backend_os = _OpenSlideBackend(self.path, direct_jpeg)
            osr = backend_os.osr
            level_dims = tuple(osr.level_dimensions)
            props = dict(osr.properties)
        w0, h0 = level_dims[0]
        if not (0 < w0 <= MAX_SIDE_L0 and 0 < h0 <= MAX_SIDE_L0):
            self._backend.close()
            raise SlideError(
                f"{self.path.name} claims an impossible size of {w0} x {h0} pixels and looks corrupt."
            )
        downsamples = tuple(w0 / w for (w, _h) in level_dims)
        if isinstance(self._backend, _OpenSlideBackend):
            downsamples = tuple(float(d) for d in self._backend.osr.level_downsamples)
            associated = tuple(sorted(self._backend.osr.associated_images.keys()))
        else:
            associated = ()
        file_mpp = _parse_float(props.get("openslide.mpp-x"))
        file_mpp_y = _parse_float(props.get("openslide.mpp-y"))
        if file_mpp is not None and file_mpp_y is not None:
            file_mpp = (file_mpp + file_mpp_y) / 2
        self.info = SlideInfo(
            path=self.path,
            vendor=props.get("openslide.vendor", "unknown"),
            dimensions=(w0, h0),
            level_dimensions=level_dims,
            level_downsamples=downsamples,
            mpp=mpp if mpp is not None else file_mpp,
            mpp_from_file=mpp is None and file_mpp is not None,
            objective_power=_parse_float(props.get("openslide.objective-power")),
            background=_parse_colour(props.get("openslide.background-color")),
            associated=associated,
            properties=props,
        )
        # A truncated file often opens but fails on its first pixel read: fail now, not later.
        self._validate()

    # -- properties -------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.info.dimensions

    @property
    def mpp(self) -> float | None:
        return self.info.mpp

    def with_mpp(self, mpp: float) -> Slide:
        """The same slide at a resolution entered by hand (um per level-0 pixel).

        Slides are immutable: this returns a new Slide that shares the open file (closing either
        closes it), so whoever held the old one keeps a consistent view of it.
        """
        if not (np.isfinite(mpp) and 0.01 <= mpp <= 100):
            raise SlideError(f"{mpp} um per pixel is not a plausible resolution (0.01 to 100).")
        new = copy.copy(self)
        new.info = replace(self.info, mpp=float(mpp), mpp_from_file=False)
        return new

    def shares_file(self, other: Slide) -> bool:
        """True when ``other`` is this slide at another resolution (:meth:`with_mpp`): one open file."""
        return self._file is other._file

    def fingerprint(self) -> str:
        """Stable id of the slide's content: size, file size and the first and last 1 MiB.

        Computed once per open slide (it reads up to 2 MiB), then reused.
        """
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256()
        st = self.path.stat()
        h.update(f"{self.info.dimensions}:{st.st_size}".encode())
        with open(self.path, "rb") as f:
            h.update(f.read(1 << 20))
            if st.st_size > 1 << 20:
                f.seek(max(0, st.st_size - (1 << 20)))
                h.update(f.read(1 << 20))
        return h.hexdigest()[:16]

    # -- reading ----------------------------------------------------------------------------
    def read(self, rect_l0: Rect, size: tuple[int, int], reduced_decode: bool = False) -> np.ndarray:
        """Read level-0 rectangle ``rect_l0`` resized to ``size`` = (w, h); RGB uint8 (h, w, 3)."""
        if rect_l0.is_empty:
            raise ValueError(f"empty read {rect_l0}")
        return self.read_box((rect_l0.x, rect_l0.y, rect_l0.right, rect_l0.bottom), size, reduced_decode)

    def read_box(self, box_l0: tuple[float, float, float, float], size: tuple[int, int],
                 reduced_decode: bool = False) -> np.ndarray:
        """Read the level-0 box (x0, y0, x1, y1), corners may be fractional, at ``size`` = (w, h).

        ``reduced_decode`` lets a JPEG pyramid level be decoded at 1/2, 1/4 or 1/8 of its size
        where the output is at least that much smaller (libjpeg's scaled inverse DCT: a smooth
        reduction, several times faster). The display reads so; the model and exports read the
        level's own pixels, resized with a box filter, as the model was validated.
        """
        x0, y0, x1, y1 = box_l0
        out_w, out_h = size
        if x1 <= x0 or y1 <= y0 or out_w <= 0 or out_h <= 0:
            raise ValueError(f"empty read {box_l0} -> {size}")
        downsample = min((x1 - x0) / out_w, (y1 - y0) / out_h)
        level = best_level(self.info.level_downsamples, downsample)
        scale = 1
        if reduced_decode:  # the same 1% tolerance as the choice of level
            scale = max(s for s in self._backend.scales(level) if s <= downsample / self.info.level_downsamples[level] * 1.01)
        ds = self.info.level_downsamples[level] * scale  # level-0 pixels per pixel read
        x_lv, y_lv, w_lv, h_lv = to_level(Rect.from_corners(math.floor(x0), math.floor(y0),
                                                           math.ceil(x1), math.ceil(y1)), ds)
        # Read the covering level region, then crop the exact sub-pixel window while resizing.
        with self._reading():
            rgba = self._backend.read_level(level, x_lv, y_lv, w_lv, h_lv, scale)
        rgb = composite_rgba(rgba, self.info.background)
        fx0, fy0 = x0 / ds - x_lv, y0 / ds - y_lv
        fx1, fy1 = x1 / ds - x_lv, y1 / ds - y_lv
        if (fx0, fy0, fx1, fy1) == (0, 0, w_lv, h_lv):
            return resize_rgb(rgb, (out_w, out_h))
        shrinking = out_w < (fx1 - fx0) and out_h < (fy1 - fy0)
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(rgb).resize((out_w, out_h), resample, box=(fx0, fy0, fx1, fy1)))

    def read_at_mpp(self, rect_l0: Rect, mpp: float) -> np.ndarray:
        """Read ``rect_l0`` at a physical resolution ``mpp`` (um per output pixel)."""
        if self.mpp is None:
            raise SlideError("The slide's resolution (MPP) is unknown; enter it first.")
        scale = self.mpp / mpp
        return self.read(rect_l0, (max(1, round(rect_l0.w * scale)), max(1, round(rect_l0.h * scale))))

    def thumbnail(self, max_side: int) -> np.ndarray:
        """Whole slide as RGB with its longer side ``max_side`` pixels, to show (reduced decoding)."""
        w0, h0 = self.dimensions
        scale = max_side / max(w0, h0)
        return self.read(Rect(0, 0, w0, h0), (max(1, round(w0 * scale)), max(1, round(h0 * scale))),
                         reduced_decode=True)

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image (label, macro, thumbnail) as RGB uint8."""
        if name not in self.info.associated:
            raise KeyError(name)
        with self._reading():
            return self._backend.associated_image(name)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Count a read in flight; a closed slide refuses new reads with one sentence."""
        f = self._file
        with f.cond:
            if f.closed:
                raise SlideError(f"{self.path.name} was closed.")
            f.active += 1
        try:
            yield
        finally:
            with f.cond:
                f.active -= 1
                f.cond.notify_all()

    def _validate(self) -> None:
        last = len(self.info.level_dimensions) - 1
        w_lv, h_lv = self.info.level_dimensions[last]
        try:
            self._backend.read_level(last, 0, 0, min(256, w_lv), min(256, h_lv))
        except SlideError:
            self.close()
            raise
        except Exception as exc:  # a decoder error surfaces in many types
            self.close()
            log.exception("validation read failed for %s", self.path)
            raise SlideError(f"{self.path.name} is damaged: its pixels cannot be read.") from exc

    def close(self) -> None:
        """Close the file once the reads in flight (from any thread) are done; later reads fail."""
        f = self._file
        with f.cond:
            if f.closed:
                return
            f.closed = True
            while f.active:
                f.cond.wait()
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_slide(path: str | os.PathLike[str], mpp: float | None = None, direct_jpeg: bool = True) -> Slide:
    """Open a slide or plain image; raises :class:`SlideError` with a one-sentence message."""
    return Slide(path, mpp=mpp, direct_jpeg=direct_jpeg)
