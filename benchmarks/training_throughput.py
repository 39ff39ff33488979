"""Training and inference throughput on real patches vs the pure model rate (issue 3).

Pure rates run the network alone on random tensors of the same batch size; the pipeline rates
run the real code paths (fit() with augmentation and sampling; predict_patches on real patches).
Also prints the CPU inference rate of WRN-16-k and EfficientNet-Lite0 (stem stride 2 and 1), with
each one's ratio to WRN-16-2 in the same process, for the size trade-off in the model card.
Run: python -m benchmarks.training_throughput [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from inference.model import Architecture, ModelMeta, build, pick_device
from training.data import load_folder, split_groups
from training.loop import StepReport, TrainConfig, fit, predict_patches

PATCHES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "idc_patches"


def random_images(batch: int, device: torch.device) -> torch.Tensor:
    """Random uint8 RGB patches scaled to about unit range, like the real inputs."""
    rng = np.random.default_rng(0)
    return (torch.from_numpy(rng.integers(0, 256, (batch, 3, 50, 50), dtype=np.uint8)).float().to(device) / 255 - 0.5) / 0.25


def pure_train_rate(arch: Architecture, device: torch.device, batch: int, seconds: float) -> float:
    net = build(arch).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x = random_images(batch, device)
    y = torch.randint(0, 2, (batch,), device=device).float()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += batch
    return n / (time.perf_counter() - t0)


def pure_infer_rate(arch: Architecture, device: torch.device, batch: int, seconds: float) -> float:
    net = build(arch).to(device).eval()
    x = random_images(batch, device)
    n, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - t0 < seconds:
            net(x).cpu()
            n += batch
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--data", default=str(PATCHES))
    args = ap.parse_args()
    device = pick_device(args.device)
    arch = Architecture(16, 2)
    data = load_folder(args.data, exclude_patients=["8975"], limit_per_patient=30, seed=0)
    parts = split_groups(data.groups, data.labels, [0.8, 0.2], 0)
    train, val = data.subset(parts[0]), data.subset(parts[1])
    batch = 128

    pure_train = pure_train_rate(arch, device, batch, args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        steps = max(4, int(pure_train * args.seconds / batch))
        config = TrainConfig(out=str(Path(tmp) / "m.pt"), arch=arch, epochs=1, samples_per_epoch=steps * batch,
                             batch_size=batch, device=str(device))
        t0 = time.perf_counter()
        n = 0
        for r in fit(config, train, val):
            if isinstance(r, StepReport):
                if r.step == 0:
                    t0 = time.perf_counter()  # skip the first (warm-up) batch
                else:
                    n += batch
                if r.step == r.steps - 1:
                    break
        pipe_train = n / (time.perf_counter() - t0)

    infer_batch = 256 if device.type == "cuda" else 64
    pure_inf = pure_infer_rate(arch, device, infer_batch, args.seconds)
    meta = ModelMeta(arch=arch, mpp=TrainConfig.mpp)
    net = build(arch).to(device).eval()
    imgs = val.images[:4096]
    predict_patches(net, meta, imgs[:infer_batch], device)
    t0 = time.perf_counter()
    predict_patches(net, meta, imgs, device)
    pipe_inf = len(imgs) / (time.perf_counter() - t0)

    print(f"device {device}, torch threads {torch.get_num_threads()}, WRN-16-2, batch {batch} (train) / "
          f"{infer_batch} (inference); pure rates on random image tensors")
    print(f"training: fit() on real patches {pipe_train:.0f} patches/s; pure forward+backward {pure_train:.0f}/s; "
          f"ratio {pipe_train / pure_train:.0%}")
    print(f"inference: predict_patches on real patches {pipe_inf:.0f} patches/s; pure forward {pure_inf:.0f}/s; "
          f"ratio {pipe_inf / pure_inf:.0%}")
    print("model size trade-off, pure inference rate (patches/s), its ratio to WRN-16-2, parameters:")
    archs = [Architecture(16, widen) for widen in (1, 2, 4, 8)] + [
        Architecture(family="efficientnet-lite0", stem_stride=stride) for stride in (2, 1)
    ]
    rates = {a: pure_infer_rate(a, device, infer_batch, args.seconds / 2) for a in archs}
    for a, rate in rates.items():
        params = sum(p.numel() for p in build(a).parameters())
        print(f"  {a.name:22} {rate:8.0f} patches/s  {rate / rates[arch]:5.2f}x  {params / 1e6:.2f} M parameters")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
