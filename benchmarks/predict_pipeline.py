"""Whole-slide inference benchmark (issue 4), all figures from one process.

On a generated 54,000 x 54,000 slide at 0.5 um/px (a 20x scan; real tissue texture, JPEG,
3 levels), over 12,000 tissue cells, with the shipped model:

(a) pipeline patches/s vs a naive pipeline (one read_region per patch at level 0, resize,
    batch of 1), measured on the same cells; target >= 20x;
(b) pipeline patches/s as a fraction of the model's pure compute rate on random tensors of
    the same batch size; target >= 80%;
(c) time from pressing "run" to the first heatmap cells (tissue detection included); <= 2 s;
(d) the GUI event loop's worst lag while inference runs in the viewer; target <= 50 ms.

With --baseline MODEL, that model's whole-slide pipeline runs on the same cells in the same
process, and the ratio is printed (issue 10: a new model keeps >= 0.5x the shipped one's rate).
--model measures another checkpoint than the shipped one (a wider field of view reads each
patch with its margin, ModelMeta.margin).

Run: python -m benchmarks.predict_pipeline [--device cpu|cuda] [--model M.pt] [--baseline B.pt]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import openslide  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.synthetic import big_slide  # noqa: E402
from inference.model import load_checkpoint, pick_device  # noqa: E402
from inference.predict import PredictSettings, plan, predict_slide  # noqa: E402
from inference.slide import open_slide  # noqa: E402
from resources import shipped_model_path  # noqa: E402


def pure_model_rate(model, device: torch.device, batch: int, kind: str, seconds: float = 8.0) -> float:  # noqa: ANN001
    """Patches/s of the network alone on random tensors already on the device.

    kind "normal": standard normal tensors; "image": random uint8 RGB patches, normalised as
    the pipeline does (CPU convolutions run measurably slower on the former).
    """
    net = model.net.to(device).eval()
    cuda = device.type == "cuda"
    p = model.meta.input_px
    if kind == "normal":
        x = torch.randn(batch, 3, p, p, device=device)
    else:
        rng = np.random.default_rng(0)
        x = model.normalise(rng.integers(0, 256, (batch, p, p, 3), dtype=np.uint8), device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    n = 0
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        net(x)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.sigmoid(net(x).float()).cpu()
            n += batch
    return n / (time.perf_counter() - t0)


def naive_rate(path: str, model, grid, cells: list[tuple[int, int]], device: torch.device) -> float:  # noqa: ANN001
    """One read_region per patch (with its margin) at level 0, resize to the model's input, batch of 1."""
    osr = openslide.OpenSlide(path)
    net = model.net.to(device).eval()
    p, m = model.meta.input_px, model.meta.margin * grid.scale
    t0 = time.perf_counter()
    for r, c in cells:
        x0, y0, x1, y1 = grid.patch_box(r, c)
        x, y, side = round(x0 - m), round(y0 - m), round(x1 - x0 + 2 * m)
        img = osr.read_region((x, y), 0, (side, side)).convert("RGB").resize((p, p), Image.BILINEAR)
        with torch.inference_mode():
            x = model.normalise(np.asarray(img)[None], device)
            torch.sigmoid(net(x)).item()
    osr.close()
    return len(cells) / (time.perf_counter() - t0)


def gui_lag(path: str, model, device: str, seconds: float) -> tuple[float, int]:  # noqa: ANN001
    """Worst gap between 5 ms timer ticks while the viewer runs inference (ms), and cells done."""
    from PySide6.QtCore import QElapsedTimer, QTimer
    from PySide6.QtWidgets import QApplication

    from viewer.main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    w = MainWindow(interactive=False, model=model, device=device)
    w.resize(1600, 1000)
    w.show()
    w.open_path(path)
    t_settle = time.perf_counter()
    while time.perf_counter() - t_settle < 1.0:  # first paint and first tiles, before inference
        app.processEvents()
        time.sleep(0.001)
    gaps: list[float] = []
    clock = QElapsedTimer()
    clock.start()
    last = [clock.elapsed()]

    def tick() -> None:
        now = clock.elapsed()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(tick)
    timer.start()
    w.inference.start()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds and w.inference.runner.running():
        app.processEvents()
        time.sleep(0.001)
    done = int(w.inference.heatmap.patch_done.sum()) if w.inference.heatmap is not None else 0
    timer.stop()
    w.close()
    return (max(gaps) - 5 if gaps else float("nan")), done


def pipeline(slide, model, device: torch.device, settings: PredictSettings):  # noqa: ANN001, ANN201
    """(heatmap, seconds to the first cells, seconds for the whole slide, patches/s after the first batch)."""
    t0 = time.perf_counter()
    hm = plan(slide, model, settings)
    gen = predict_slide(slide, model, hm, device, settings)
    first = next(gen)
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    last = first
    for result in gen:
        last = result
    whole = time.perf_counter() - t0
    return hm, t_first, whole, (last.done - first.done) / (time.perf_counter() - t1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--naive-cells", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 64 on CPU, 256 on GPU")
    ap.add_argument("--model", default=None, help="checkpoint to measure (default: the shipped model)")
    ap.add_argument("--baseline", default=None, help="checkpoint whose pipeline rate is measured alongside")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    device = pick_device(args.device)
    path = big_slide(54_000, 54_000, mpp=0.5, scale_l0=8.0)
    model = load_checkpoint(args.model or shipped_model_path())
    batch_size = args.batch_size or (256 if device.type == "cuda" else 64)
    settings = PredictSettings(batch_size=batch_size)

    with open_slide(path) as slide:
        hm, t_first, whole, rate = pipeline(slide, model, device, settings)
        base_rate = pipeline(slide, load_checkpoint(args.baseline), device, settings)[3] if args.baseline else None
        total = int(hm.tissue.sum())
    cells = [tuple(rc) for rc in np.argwhere(hm.tissue)[:: max(1, total // args.naive_cells)][: args.naive_cells]]
    naive = naive_rate(str(path), model, hm.grid, cells, device)
    pure = pure_model_rate(model, device, batch_size, "image")
    pure_normal = pure_model_rate(model, device, batch_size, "normal")
    lag_ms, lag_cells = gui_lag(str(path), model, str(device), seconds=20)

    print(f"slide {path.name}: {slide.dimensions[0]} x {slide.dimensions[1]} at {slide.mpp} um/px, "
          f"{total} tissue cells of {hm.grid.patch_shape[0] * hm.grid.patch_shape[1]}; device {device}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"model {model.model_id} ({model.meta.input_px} x {model.meta.input_px} px input)")
    print(f"whole slide: {whole:.1f} s, pipeline {rate:.0f} patches/s")
    if base_rate is not None:
        print(f"    baseline {args.baseline}: pipeline {base_rate:.0f} patches/s on the same cells; "
              f"ratio {rate / base_rate:.2f}x  (issue 10 target >= 0.5x)")
    print(f"(a) naive pipeline {naive:.1f} patches/s on {len(cells)} cells; ratio pipeline/naive {rate / naive:.1f}x"
          f"  (target >= 20x)")
    print(f"(b) pure model on random image tensors {pure:.0f} patches/s (batch {batch_size}); "
          f"pipeline/pure {rate / pure:.0%}  (target >= 80%)")
    print(f"    (on standard normal tensors: {pure_normal:.0f} patches/s; pipeline/pure {rate / pure_normal:.0%})")
    print(f"(c) time to first heatmap cells: {t_first:.2f} s  (target <= 2 s)")
    print(f"(d) GUI event loop worst lag during inference: {lag_ms:.0f} ms over {lag_cells} cells"
          f"  (target <= 50 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
