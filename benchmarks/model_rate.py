"""Whole-slide rate of each shipped model per mm2 of tissue (issue 34), in one process.

Both models run the whole pipeline (tissue, reads at their own resolution, network, heatmap) on
the same slide, the CMU test slide (a real 0.499 um/px scan, 1.1 x 1.5 mm) tiled 3 x 3 into a
generated pyramidal slide (3.3 x 4.4 mm, JPEG), with the same torch threads. The tissue area is
each model's tissue cells times its cell's area, so the two rates count the same tissue the way
each model sees it. Printed: seconds, tissue mm2, mm2/s and cells/s per model, and the metastasis
model's rate as a ratio to the IDC model's (target >= 1.0x); per model, the same run with the
network as loaded (the baseline: no folded batch norms, no channels-last memory) and the
speed-up; then the time the slide's tissue mask and reads alone take (the same regions at the
model's resolution, one thread, no network): the rate no network could beat.

Run: python -m benchmarks.model_rate [--threads 2] [--metastasis CKPT]  (a candidate in place of
the shipped metastasis model)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from inference import predict as predict_module
from inference.model import LoadedModel, load_checkpoint
from inference.predict import PredictSettings, _blocks, _read_region, plan, predict_slide
from inference.slide import Slide, open_slide
from inference.tiff_writer import write_pyramid_from_array
from resources import SHIPPED_MODELS, resource_path, shipped_model_path


def tiled_cmu(out: Path, reps: int = 3) -> Path:
    with open_slide(resource_path("CMU-1-Small-Region.svs")) as slide:
        w, h = slide.dimensions
        from inference.geometry import Rect

        img = slide.read(Rect(0, 0, w, h), (w, h))
        mpp = slide.mpp
    return write_pyramid_from_array(out, np.tile(img, (reps, reps, 1)), mpp, downsamples=(1, 4, 16), quality=90)


def timed(slide: Slide, model: LoadedModel, fast: bool = True) -> tuple[float, int]:
    """Seconds for the whole pipeline on this slide (the better of two runs) and the tissue cells
    it scored; ``fast`` False: the network as loaded (no folded batch norms, no channels-last),
    the baseline."""
    copy = predict_module.inference_copy
    if not fast:
        predict_module.inference_copy = lambda net, device: net.to(device)
    try:
        best = float("inf")
        for _ in range(2):  # the better of two runs: the first also warms oneDNN and the caches up
            t = time.perf_counter()
            hm = plan(slide, model, PredictSettings())
            for _ in predict_slide(slide, model, hm, torch.device("cpu")):
                pass
            best = min(best, time.perf_counter() - t)
        return best, int(hm.tissue.sum())
    finally:
        predict_module.inference_copy = copy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--metastasis", default=None, metavar="CKPT", help="measure this checkpoint as the metastasis model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = tiled_cmu(Path(tmp) / "cmu3x3.tif")
        rates: dict[str, float] = {}
        with open_slide(path) as slide:
            print(f"slide: {slide.dimensions[0]} x {slide.dimensions[1]} px at {slide.mpp:g} um/px, "
                  f"{args.threads} torch threads")
            models = {name: load_checkpoint(args.metastasis if name == "metastasis" and args.metastasis
                                            else shipped_model_path(name)) for name in SHIPPED_MODELS}
            area = {}
            for name, model in models.items():
                s, cells = timed(slide, model)
                area[name] = mm2 = cells * (model.meta.patch_size * model.meta.mpp / 1000) ** 2
                rates[name] = mm2 / s
                print(f"{name:11} {s:7.1f} s  {mm2:6.2f} mm2 tissue  {mm2 / s:7.3f} mm2/s  {cells / s:7.0f} cells/s "
                      f"({model.meta.input_px} px input per {model.meta.patch_size} px cell at {model.meta.mpp:g} um/px)")
            print(f"metastasis / idc rate per mm2: {rates['metastasis'] / rates['idc']:.3f}x")
            for name, model in models.items():
                s, _ = timed(slide, model, fast=False)
                print(f"{name:11} baseline, the network as loaded: {s:6.1f} s; folded and channels-last "
                      f"{rates[name] * s / area[name]:.2f}x as fast")
            for name, model in models.items():
                t = time.perf_counter()
                hm = plan(slide, model, PredictSettings())
                for r0, c0, rr, cc in _blocks(hm.tissue):
                    _read_region(slide, hm.grid, r0, c0, rr, cc, model.meta.margin)
                s = time.perf_counter() - t
                print(f"{name:11} tissue and reads alone {s:6.1f} s  {area[name] / s:7.3f} mm2/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
