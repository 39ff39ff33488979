"""Whole-slide rate of each shipped model per mm2 of tissue (issue 34), in one process.

Both models run the whole pipeline (tissue, reads at their own resolution, network, heatmap) on
the same slide, the CMU test slide (a real 0.499 um/px scan, 1.1 x 1.5 mm) tiled 3 x 3 into a
generated pyramidal slide (3.3 x 4.4 mm, JPEG), with the same torch threads. The tissue area is
each model's tissue cells times its cell's area, so the two rates count the same tissue the way
each model sees it. Printed: seconds, tissue mm2, mm2/s and cells/s per model, and the metastasis
model's rate as a ratio to the IDC model's (target >= 1.0x); then, per model, the time the
slide's tissue mask and reads alone take (the same regions at the model's resolution, one
thread, no network): the rate no network could beat.

Run: python -m benchmarks.model_rate [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from inference.model import load_checkpoint
from inference.predict import PredictSettings, _blocks, _read_region, plan, predict_slide
from inference.slide import open_slide
from inference.tiff_writer import write_pyramid_from_array
from resources import SHIPPED_MODELS, resource_path, shipped_model_path


def tiled_cmu(out: Path, reps: int = 3) -> Path:
    with open_slide(resource_path("CMU-1-Small-Region.svs")) as slide:
        w, h = slide.dimensions
        from inference.geometry import Rect

        img = slide.read(Rect(0, 0, w, h), (w, h))
        mpp = slide.mpp
    return write_pyramid_from_array(out, np.tile(img, (reps, reps, 1)), mpp, downsamples=(1, 4, 16), quality=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = tiled_cmu(Path(tmp) / "cmu3x3.tif")
        rates: dict[str, float] = {}
        reads = {}
        with open_slide(path) as slide:
            print(f"slide: {slide.dimensions[0]} x {slide.dimensions[1]} px at {slide.mpp:g} um/px, "
                  f"{args.threads} torch threads")
            for name in SHIPPED_MODELS:
                model = load_checkpoint(shipped_model_path(name))
                t = time.perf_counter()
                hm = plan(slide, model, PredictSettings())
                for _ in predict_slide(slide, model, hm, torch.device("cpu")):
                    pass
                s = time.perf_counter() - t
                cells = int(hm.tissue.sum())
                mm2 = cells * (model.meta.patch_size * model.meta.mpp / 1000) ** 2
                rates[name] = mm2 / s
                reads[name] = (mm2, model)
                print(f"{name:11} {s:7.1f} s  {mm2:6.2f} mm2 tissue  {mm2 / s:7.3f} mm2/s  {cells / s:7.0f} cells/s "
                      f"({model.meta.input_px} px input per {model.meta.patch_size} px cell at {model.meta.mpp:g} um/px)")
            print(f"metastasis / idc rate per mm2: {rates['metastasis'] / rates['idc']:.3f}x")
            for name, (mm2, model) in reads.items():
                t = time.perf_counter()
                hm = plan(slide, model, PredictSettings())
                for r0, c0, rr, cc in _blocks(hm.tissue):
                    _read_region(slide, hm.grid, r0, c0, rr, cc, model.meta.margin)
                s = time.perf_counter() - t
                print(f"{name:11} tissue and reads alone {s:6.1f} s  {mm2 / s:7.3f} mm2/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
