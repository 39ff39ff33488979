"""Pan/zoom benchmark of the slide view against plain OpenSlide read_region.

On a generated 50,000 x 50,000 JPEG pyramid (real tissue texture, 3 levels) in a 1920x1080
view, in one process:

* cold: time from a jump to an unseen place until every visible tile is sharp, against
  OpenSlide read_region of the same viewport at the same pyramid level (baseline), and three
  ways in the same process: as before direct JPEG decoding and batched repaints (the slide opened
  with ``direct_jpeg=False``, ``SlideView(repaint_ms=0)``), with direct decoding only, and as the
  viewer is now;
* warm: frame time (one synchronous repaint) while panning over already-visited places,
  against the same baseline read of one viewport;
* peak RSS of the process.

Targets (issue 2): warm p95 <= 16 ms, cold full-sharp viewport <= 150 ms, RSS <= 1 GB.
Run: python -m benchmarks.viewer_pan_zoom
"""

from __future__ import annotations

import os
import resource
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import openslide  # noqa: E402
from PySide6.QtCore import QEventLoop, QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from benchmarks.synthetic import big_slide, percentile  # noqa: E402
from inference.slide import Slide, open_slide  # noqa: E402
from viewer.slide_view import REPAINT_MS, SlideView  # noqa: E402

VIEW_W, VIEW_H = 1920, 1080
JUMPS = 30  # cold jumps per run, 6 at each zoom


def wait_sharp(app: QApplication, view: SlideView, timeout_s: float = 30) -> float:
    """Seconds until the view reports every visible tile at final resolution."""
    t0 = time.perf_counter()
    loop = QEventLoop()
    view.became_sharp.connect(loop.quit)
    QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    view.request_update()
    view.viewport().repaint()
    if not view.is_sharp():
        loop.exec()
    view.became_sharp.disconnect(loop.quit)
    return time.perf_counter() - t0


def baseline_read(osr: openslide.OpenSlide, cx: float, cy: float, scale: float) -> float:
    """Plain OpenSlide: one read_region of the viewport at the best level, resized."""
    ds = 1 / scale
    level = osr.get_best_level_for_downsample(ds)
    lds = osr.level_downsamples[level]
    w_l0, h_l0 = VIEW_W * ds, VIEW_H * ds
    t0 = time.perf_counter()
    img = osr.read_region((int(cx - w_l0 / 2), int(cy - h_l0 / 2)), level, (int(w_l0 / lds), int(h_l0 / lds)))
    if img.size != (VIEW_W, VIEW_H):
        img = img.resize((VIEW_W, VIEW_H))
    return time.perf_counter() - t0


def main() -> int:
    path = big_slide()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    slide = open_slide(path)
    osr = openslide.OpenSlide(str(path))
    rng = np.random.default_rng(0)
    w0, h0 = slide.dimensions
    scales = [1.0, 0.5, 0.25, 0.125, 0.0625]

    def new_view(s: Slide, repaint_ms: int) -> SlideView:
        view = SlideView(repaint_ms=repaint_ms)
        view.resize(VIEW_W, VIEW_H)
        view.show()
        view.set_slide(s)
        wait_sharp(app, view)
        return view

    def cold_run(s: Slide, repaint_ms: int) -> tuple[list[float], dict[float, list[float]], list[float]]:
        """Jumps to unseen places at several zoom levels (each run its own places: nothing cached)."""
        view = new_view(s, repaint_ms)
        times, base, by_scale = [], [], {}
        for i in range(JUMPS):
            scale = scales[i % len(scales)]
            cx, cy = rng.uniform(0.1, 0.9) * w0, rng.uniform(0.1, 0.9) * h0
            view.set_scale(scale)
            view.center_on_l0(cx, cy)
            times.append(wait_sharp(app, view))
            by_scale.setdefault(scale, []).append(times[-1])
            base.append(baseline_read(osr, cx, cy, scale))
        view.clear_slide()
        view.deleteLater()
        return times, by_scale, base

    # Cold, three ways in one process: as before this work (OpenSlide decoding every tile, a
    # repaint at every pass of the event loop that brought tiles), with direct JPEG decoding,
    # and as the viewer is now (direct decoding, tiles drawn in batches).
    with open_slide(path, direct_jpeg=False) as slow:
        runs = {"OpenSlide decoding, a repaint per tile arrival": cold_run(slow, 0)}
    runs["direct JPEG decoding, a repaint per tile arrival"] = cold_run(slide, 0)
    cold, by_scale, cold_base = runs["direct JPEG decoding, batched repaints (the viewer)"] = cold_run(slide, REPAINT_MS)
    view = new_view(slide, REPAINT_MS)

    # Warm: pan back and forth over a visited strip at 1:1 and at 0.25.
    warm, warm_base = [], []
    for scale in (1.0, 0.25):
        view.set_scale(scale)
        x0, y0 = w0 * 0.3, h0 * 0.4
        span = VIEW_W / scale
        for k in range(13):  # visit the strip once (cold), then time repaints
            view.center_on_l0(x0 + k * span / 12, y0)
            wait_sharp(app, view)
        for rep in range(3):
            for k in range(13):
                view.center_on_l0(x0 + k * span / 12, y0)
                app.processEvents()
                t0 = time.perf_counter()
                view.viewport().repaint()
                warm.append(time.perf_counter() - t0)
                if rep == 0:
                    warm_base.append(baseline_read(osr, x0 + k * span / 12, y0, scale))

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ms = 1000
    print(f"slide: {path.name}, {w0} x {h0}, levels {slide.info.level_downsamples}, viewport {VIEW_W}x{VIEW_H}")
    print(f"cold full-sharp viewport: p50 {percentile(cold, 50) * ms:.1f} ms, p95 {percentile(cold, 95) * ms:.1f} ms"
          f"  (target <= 150 ms)")
    print("  by zoom: " + ", ".join(f"{s:g}x of level 0: {percentile(v, 50) * ms:.0f} ms" for s, v in by_scale.items()))
    first = next(iter(runs.values()))
    for name, (times, zooms, _) in runs.items():
        print(f"  {name}: p50 {percentile(times, 50) * ms:.1f} ms, p95 {percentile(times, 95) * ms:.1f} ms, "
              f"ratio to the first p50 {percentile(times, 50) / percentile(first[0], 50):.2f}; by zoom: "
              + ", ".join(f"{s:g}x {percentile(v, 50) * ms:.0f} ms" for s, v in zooms.items()))
    print(f"  baseline OpenSlide read_region of same viewports: p50 {percentile(cold_base, 50) * ms:.1f} ms,"
          f" p95 {percentile(cold_base, 95) * ms:.1f} ms")
    print(f"  ratio cold p50 / baseline p50: {percentile(cold, 50) / percentile(cold_base, 50):.2f}")
    print(f"warm frame: p50 {percentile(warm, 50) * ms:.2f} ms, p95 {percentile(warm, 95) * ms:.2f} ms  (target <= 16 ms)")
    print(f"  baseline read_region per frame: p50 {percentile(warm_base, 50) * ms:.1f} ms")
    print(f"  ratio baseline p50 / warm p50: {percentile(warm_base, 50) / percentile(warm, 50):.1f}x faster")
    print(f"peak RSS: {rss_mb:.0f} MB  (target <= 1024 MB)")
    view.clear_slide()
    slide.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
