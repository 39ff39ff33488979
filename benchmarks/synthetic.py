"""Large synthetic pyramidal slides for benchmarks, textured with real tissue.

The texture is the bundled demo slide (real breast H&E, patient 8975) mirror-tiled over the
plane, so JPEG tiles compress and decode like a real scan. Generated slides are cached under
~/.cache/idc-viewer/bench (or $IDC_VIEWER_CACHE/bench) and reused.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from inference.slide import open_slide, resize_rgb
from inference.tiff_writer import write_pyramid
from resources import demo_slide_path


def cache_dir() -> Path:
    base = Path(os.environ.get("IDC_VIEWER_CACHE", Path.home() / ".cache" / "idc-viewer"))
    d = base / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def tissue_texture() -> np.ndarray:
    """The demo slide's level 0 (real tissue), cropped to its tissue-rich centre."""
    with open_slide(demo_slide_path()) as s:
        w, h = s.dimensions
        from inference.geometry import Rect

        r = Rect(w // 8, h // 6, w * 3 // 4, h * 2 // 3)
        return s.read(r, (r.w, r.h))


def mirror_tile_fn(texture: np.ndarray, scale_l0: float):  # noqa: ANN201
    """tile_fn for write_pyramid: the texture, upsampled by ``scale_l0``, mirror-tiled."""
    cache: dict[float, np.ndarray] = {}

    def fn(ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        if ds not in cache:
            f = scale_l0 / ds
            th, tw = texture.shape[:2]
            base = resize_rgb(texture, (max(1, round(tw * f)), max(1, round(th * f))))
            # One period of the mirrored texture: [T | flip(T)] in both axes.
            top = np.concatenate([base, base[:, ::-1]], axis=1)
            cache[ds] = np.concatenate([top, top[::-1]], axis=0)
        per = cache[ds]
        ph, pw = per.shape[:2]
        ys = (np.arange(y, y + h) % ph)[:, None]
        xs = (np.arange(x, x + w) % pw)[None, :]
        return per[ys, xs]

    return fn


def big_slide(width: int = 50_000, height: int = 50_000, mpp: float = 0.25, scale_l0: float = 4.0) -> Path:
    """A (cached) JPEG pyramid of ``width`` x ``height`` at levels 1, 4, 16."""
    path = cache_dir() / f"tissue_{width}x{height}_{mpp}_{scale_l0}.tif"
    if not path.exists():
        tex = tissue_texture()
        levels = [1, 4, 16]
        while max(width, height) / levels[-1] > 4096:
            levels.append(levels[-1] * 4)
        print(f"generating {path.name} ({width} x {height}, levels {levels}); cached for later runs", flush=True)
        write_pyramid(path, (width, height), mirror_tile_fn(tex, scale_l0), mpp, downsamples=levels, quality=85)
    return path


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan
