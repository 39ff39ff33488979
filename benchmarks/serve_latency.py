"""Latency of `idc-viewer serve` under load (issue 35), measured in one process.

A real uvicorn server on 127.0.0.1 (CPU, the shipped models loaded once) and real HTTP clients
(httpx): first 25 patch requests one at a time (the baseline), then 200 from 8 concurrent clients,
each a real PCam patch from ../shared/data/pcam_sample scored by the metastasis model (and a
quarter by the IDC model, with its cell alone). Printed: p50 / p95 / max latency, requests/s and
errors of both, and the concurrent p50 as a ratio to the one-at-a-time p50.

Run: python -m benchmarks.serve_latency [--requests 200] [--clients 8]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from inference.serve import create_app
from resources import resource_path

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pcam_sample"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    patches = [p.read_bytes() for p in sorted(SAMPLE.glob("*.tif"))[: args.requests]]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cmu.svs").write_bytes(resource_path("CMU-1-Small-Region.svs").read_bytes())
        app = create_app(tmp, "cpu")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/patches"
        local = threading.local()

        def one(i: int) -> tuple[float, bool]:
            client = getattr(local, "client", None) or httpx.Client(timeout=60)
            local.client = client
            model = "idc" if i % 4 == 3 else "metastasis"
            data = patches[i % len(patches)]
            if model == "idc":  # the IDC model's cell alone: 50 px of the patch's centre
                from io import BytesIO

                from PIL import Image

                buf = BytesIO()
                with Image.open(BytesIO(data)) as im:
                    im.crop((23, 23, 73, 73)).save(buf, "PNG")
                data = buf.getvalue()
            t = time.perf_counter()
            r = client.post(url, files={"file": ("p.tif", data)}, data={"model": model})
            return time.perf_counter() - t, r.status_code == 200 and "probability" in r.json()

        def run(n: int, clients: int) -> tuple[np.ndarray, int, float]:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                out = list(pool.map(one, range(n)))
            wall = time.perf_counter() - t0
            lat = np.array([o[0] for o in out]) * 1000
            return lat, sum(not o[1] for o in out), n / wall

        run(8, 1)  # warm-up: first batch of each model
        rows = {"one at a time (25)": run(25, 1), f"{args.clients} clients ({args.requests})": run(args.requests, args.clients)}
        server.should_exit = True
        thread.join(timeout=30)
    print("| load | p50 ms | p95 ms | max ms | requests/s | errors |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (lat, errors, rate) in rows.items():
        print(f"| {name} | {np.percentile(lat, 50):.1f} | {np.percentile(lat, 95):.1f} | {lat.max():.1f} | "
              f"{rate:.1f} | {errors} |")
    base, load = (np.percentile(r[0], 50) for r in rows.values())
    print(f"concurrent p50 / one-at-a-time p50: {load / base:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
