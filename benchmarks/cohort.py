"""Cohort throughput: slides per minute, local engine vs Ray with 1 and 2 workers, same cohort.

    python -m benchmarks.cohort [--slides 6] [--side 2400]

Generates a cohort of JPEG pyramids of real tissue (tiles of the demo slide, 4 um/px), runs
`idc-viewer predict` on it with each engine into fresh output folders (cache off), and prints
slides/min and the ratio to the local engine, measured in this process. Ray's start-up is
included in its time, as a lab would see it; the per-slide cost it prints is what
docs/BENCHMARKS.md uses to plan a 1,000-slide cohort.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from inference.geometry import Rect
from inference.slide import open_slide
from inference.tiff_writer import write_pyramid_from_array
from resources import demo_slide_path
from viewer.cli import main


def make_cohort(folder: Path, n: int, side: int) -> list[Path]:
    """n slides of side x side px, each a mosaic of demo-slide tissue tiles in its own order."""
    with open_slide(demo_slide_path()) as s:
        w, h = s.dimensions
        tile = 600
        tiles = [s.read(Rect(x, y, tile, tile), (tile, tile)) for y in range(300, h - tile, tile)
                 for x in range(300, w - tile, tile)]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        k = side // tile
        order = rng.permutation(len(tiles))[: k * k]
        img = np.concatenate([np.concatenate([tiles[j] for j in order[r * k : (r + 1) * k]], axis=1)
                              for r in range(k)], axis=0)
        p = folder / f"case{i:02d}.tif"
        write_pyramid_from_array(p, img, 4.0, downsamples=(1, 4))
        out.append(p)
    return out


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"predict failed ({rc})")
    return time.perf_counter() - t0


def main_(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--side", type=int, default=2400, help="slide side in px at 4 um/px (a multiple of 600)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="idc-cohort-bench-") as tmp:
        tmp_path = Path(tmp)
        os.environ["IDC_VIEWER_CACHE"] = str(tmp_path / "cache")
        cohort = tmp_path / "cohort"
        cohort.mkdir()
        make_cohort(cohort, a.slides, a.side)
        runs = {
            "local": ["--engine", "local"],
            "ray, 1 worker": ["--engine", "ray", "--workers", "1"],
            "ray, 2 workers": ["--engine", "ray", "--workers", "2"],
        }
        rates = {}
        for name, extra in runs.items():
            seconds = timed(["predict", str(cohort), "--out", str(tmp_path / name.replace(" ", "_")), *extra])
            rates[name] = a.slides / seconds * 60
            print(f"{name:16} {seconds:7.1f} s  {rates[name]:6.2f} slides/min  {seconds / a.slides:6.2f} s/slide")
        base = rates["local"]
        print("ratios to the local engine: " + ", ".join(f"{k} {v / base:.2f}x" for k, v in rates.items()))
        print(f"cohort: {a.slides} slides of {a.side} x {a.side} px at 4 um/px "
              f"({(a.side * 4 / 1000) ** 2:.0f} mm2 each), {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main_()
