"""Our WSInfer export run by the real `wsinfer` package, side by side with `idc-viewer predict`
(issue 35), on the bundled demo slide (IDC) and on a mosaic of real PCam patches (metastasis).

`wsinfer` needs torchvision, which does not install beside this project's CPU torch, so it runs
in its own virtual environment given by --wsinfer-python (made once with
`python -m venv W && W/bin/pip install torch==2.14.1 torchvision==0.29.1 wsinfer openslide-python
openslide-bin "zarr<3"`), driven through its Python API (its CLI asks the internet for the zoo
registry at start-up). Both run on the CPU with 2 threads.

WSInfer tiles its patches (our cell with its margin, the model's input) edge to edge, so its grid
is coarser than ours: each WSInfer patch is compared with our cell at its centre. Printed per
slide: patches compared, Pearson r and mean |difference| of the probabilities, agreement of the
calls at 0.5, and patches/s of each (predict: the cells it computed, tissue detection included;
wsinfer: its patching and inference).

Run: python -m benchmarks.wsinfer_agreement --wsinfer-python /work/wsvenv/bin/python
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from inference.model import load_checkpoint
from inference.predict import PredictSettings, plan, predict_slide
from inference.slide import open_slide
from inference.tasks import METASTASIS
from inference.tiff_writer import write_pyramid_from_array
from inference.wsinfer import export
from resources import demo_slide_path, shipped_model_path

DRIVER = textwrap.dedent("""
    import sys, json, time, torch
    torch.set_num_threads(2)
    from pathlib import Path
    import wsinfer_zoo.client as zoo
    from wsinfer.wsi import set_backend
    set_backend("openslide")
    from wsinfer.patchlib import segment_and_patch_one_slide
    from wsinfer.modellib.models import LocalModelTorchScript
    from wsinfer.modellib.run_inference import run_inference
    slides, model_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    cfg = zoo.ModelConfiguration.from_dict(json.loads((model_dir / "config.json").read_text()))
    t = time.perf_counter()
    for s in slides.iterdir():
        segment_and_patch_one_slide(s, out, cfg.patch_size_pixels, cfg.spacing_um_px)
    model = LocalModelTorchScript(config=cfg, model_path=str(model_dir / "torchscript_model.pt"))
    run_inference(slides, out, model, batch_size=64)
    print("WSINFER_SECONDS", time.perf_counter() - t)
""")


def ours(slide_path: Path, name: str) -> tuple[np.ndarray, object, float, int]:
    model = load_checkpoint(shipped_model_path(name))
    with open_slide(slide_path) as slide:
        t = time.perf_counter()
        hm = plan(slide, model, PredictSettings())
        for _ in predict_slide(slide, model, hm, torch.device("cpu")):
            pass
        return hm.patch_prob, hm.grid, time.perf_counter() - t, int(hm.tissue.sum())


def theirs(python: str, slide_path: Path, name: str, tmp: Path) -> tuple[list[dict[str, str]], float]:
    slides, model_dir, out = tmp / f"slides_{name}", tmp / f"model_{name}", tmp / f"out_{name}"
    slides.mkdir()
    os.symlink(slide_path, slides / slide_path.name)
    export(load_checkpoint(shipped_model_path(name)), model_dir, name)
    env = {**os.environ, "WSINFER_FORCE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([python, "-c", DRIVER, str(slides), str(model_dir), str(out)], capture_output=True,
                         text=True, env=env, check=True)
    seconds = float(run.stdout.split("WSINFER_SECONDS")[1].split()[0])
    with open(out / "model-outputs-csv" / f"{slide_path.stem}.csv") as fh:
        return list(csv.DictReader(fh)), seconds


def compare(python: str, slide_path: Path, name: str, tmp: Path) -> str:
    prob, grid, our_s, our_n = ours(slide_path, name)
    rows, their_s = theirs(python, slide_path, name, tmp)
    positive = load_checkpoint(shipped_model_path(name)).meta.positive_class
    a, b = [], []
    for r in rows:
        cx = float(r["minx"]) + float(r["width"]) / 2
        cy = float(r["miny"]) + float(r["height"]) / 2
        cell = grid.cell_at(cx, cy)
        if cell is not None and np.isfinite(prob[cell]):
            a.append(prob[cell])
            b.append(float(r[f"prob_{positive}"]))
    a_arr, b_arr = np.array(a), np.array(b)
    r_val = float(np.corrcoef(a_arr, b_arr)[0, 1]) if len(a) > 2 else float("nan")
    return (f"| {slide_path.name} ({name}) | {len(a)} of {len(rows)} | {r_val:.3f} | "
            f"{np.abs(a_arr - b_arr).mean():.3f} | {((a_arr >= 0.5) == (b_arr >= 0.5)).mean():.3f} | "
            f"{our_n / our_s:.0f} ({our_n} cells, {our_s:.1f} s) | {len(rows) / their_s:.0f} ({len(rows)} patches, "
            f"{their_s:.1f} s) |")


def pcam_mosaic(out: Path) -> Path:
    from training.labelled import load_labelled

    sample = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pcam_sample"
    images = load_labelled(sample, METASTASIS).images[:144]
    mosaic = images.reshape(12, 12, 96, 96, 3).transpose(0, 2, 1, 3, 4).reshape(1152, 1152, 3)
    return write_pyramid_from_array(out, mosaic, 0.972, downsamples=(1, 4), quality=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wsinfer-python", required=True, help="python of a virtual environment with wsinfer")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        print("| slide (model) | patches compared | Pearson r | mean abs diff | calls agree (0.5) | "
              "predict patches/s | wsinfer patches/s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print(compare(args.wsinfer_python, demo_slide_path(), "idc", tmp))
        print(compare(args.wsinfer_python, pcam_mosaic(tmp / "pcam_mosaic.tif"), "metastasis", tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
