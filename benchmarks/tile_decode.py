"""Display tile reads: direct JPEG decoding against OpenSlide decoding, in one process.

On the generated 50,000 x 50,000 JPEG pyramid (levels 1, 4, 16; benchmarks.synthetic), reads
256 x 256 display tiles at 1/1 ... 1/8 of level 0 as the viewer does (``reduced_decode=True``)
from the slide opened twice: with OpenSlide decoding every tile (``direct_jpeg=False``) and with
the JPEG tiles decoded directly (inference.jpeg_tiles). Places are drawn afresh for each, so
neither reads a tile the other decoded.
Run: python -m benchmarks.tile_decode
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmarks.synthetic import big_slide
from inference.geometry import Rect
from inference.slide import open_slide

DOWNSAMPLES = (1, 2, 4, 8)
READS = 60


def main() -> int:
    path = big_slide()
    median_ms: dict[tuple[bool, int], float] = {}
    for direct in (False, True):
        rng = np.random.default_rng(int(direct))
        with open_slide(path, direct_jpeg=direct) as slide:
            w0, h0 = slide.dimensions
            for ds in DOWNSAMPLES:
                span = 256 * ds
                times = []
                for _ in range(READS):
                    x = int(rng.integers(0, w0 // span)) * span
                    y = int(rng.integers(0, h0 // span)) * span
                    t0 = time.perf_counter()
                    slide.read(Rect(x, y, span, span), (256, 256), reduced_decode=True)
                    times.append(time.perf_counter() - t0)
                median_ms[direct, ds] = 1000 * float(np.median(times))
    print(f"slide: {path.name}, display tiles of 256 px, {READS} reads each, median")
    for ds in DOWNSAMPLES:
        slow, fast = median_ms[False, ds], median_ms[True, ds]
        print(f"  1/{ds} of level 0: OpenSlide decoding {slow:.2f} ms, direct {fast:.2f} ms: {slow / fast:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
