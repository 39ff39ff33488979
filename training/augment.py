"""Training augmentation: show the model what the slide pipeline will feed it, not lossless PNGs.

Three families, all driven by the caller's seeded generators so a run is reproducible:

- geometry: dihedral flips and rotations (tissue has no orientation);
- stain: scale and shift of the haematoxylin, eosin and DAB concentrations in HED space
  (Tellez et al. 2018), then saturation, brightness and contrast;
- acquisition: every level of a scanned slide is JPEG (random quality, chroma subsampling and
  8x8 block-grid offset, since a patch never lines up with the scanner's blocks), either at the
  model's resolution or at a finer level that the reader then resamples down.

The training patches are lossless PNGs; without the acquisition step the model learns their
compression-free texture and breaks on real slides (issue 10: AUC 0.94 -> 0.71 after one JPEG
round trip at quality 90).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from inference import domain
from inference.model import to_float
from inference.slide import resize_rgb

RGB_FROM_HED = torch.tensor(domain.RGB_FROM_HED, dtype=torch.float32)  # one owner: inference.domain
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)

#: Pillow's chroma subsampling codes: 4:4:4, 4:2:2, 4:2:0 (the last is what most scanners write).
SUBSAMPLING = (0, 1, 2, 2)


@dataclass(frozen=True)
class AcquisitionConfig:
    """How often and how hard patches are compressed and resampled."""

    p_lossless: float = 0.15  # left as they are (some scanners and our own rebuilt slides)
    p_finer_level: float = 0.25  # JPEG at a finer level (1.25x to 2.5x), resampled to the model's
    quality: tuple[int, int] = (50, 95)  # inclusive range of JPEG quality


def dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip and quarter turn per sample of a float batch (n, c, h, w)."""
    n = x.shape[0]
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    k = torch.randint(0, 4, (n,), generator=gen)
    out = x.clone()
    for r in (1, 2, 3):
        m = (k == r).to(x.device)
        if m.any():
            out[m] = torch.rot90(x[m], r, (2, 3))
    return out


def stain(x: torch.Tensor, gen: torch.Generator, hed_scale: float = 0.08, hed_shift: float = 0.03) -> torch.Tensor:
    """HED stain jitter, saturation, brightness and contrast of a float batch in [0, 1] (n, 3, h, w)."""
    n = x.shape[0]
    dev = x.device
    od = -torch.log(x.clamp_min(1 / 255))
    hed = torch.einsum("nchw,cd->ndhw", od, HED_FROM_RGB.to(dev))
    alpha = (1 + hed_scale * torch.randn(n, 3, 1, 1, generator=gen)).to(dev)
    beta = (hed_shift * torch.randn(n, 3, 1, 1, generator=gen)).to(dev)
    od = torch.einsum("ndhw,dc->nchw", hed * alpha + beta, RGB_FROM_HED.to(dev))
    out = torch.exp(-od.clamp_min(0)).clamp(0, 1)
    grey = out.mean(dim=1, keepdim=True)
    sat = (1 + 0.2 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)).to(dev)
    out = grey + (out - grey) * sat
    b = (1 + 0.08 * torch.randn(n, 1, 1, 1, generator=gen)).to(dev)
    c = (1 + 0.08 * torch.randn(n, 1, 1, 1, generator=gen)).to(dev)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * c + mean * b).clamp(0, 1)


def jpeg_roundtrip(img: np.ndarray, quality: int, subsampling: int = 2, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Encode and decode an RGB uint8 image (h, w, 3) as JPEG, its top-left at ``offset`` (dy, dx)
    inside the 16x16 block grid (the surroundings are the image mirrored, as tissue continues)."""
    h, w = img.shape[:2]
    dy, dx = offset
    ph, pw = -(-(h + dy) // 16) * 16, -(-(w + dx) // 16) * 16
    canvas = np.pad(img, ((dy, ph - h - dy), (dx, pw - w - dx), (0, 0)), mode="symmetric")
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, "JPEG", quality=int(quality), subsampling=int(subsampling))
    buf.seek(0)
    with Image.open(buf) as decoded:
        out = np.asarray(decoded.convert("RGB"))
    return np.ascontiguousarray(out[dy : dy + h, dx : dx + w])


def acquire(img: np.ndarray, rng: np.random.Generator, config: AcquisitionConfig = AcquisitionConfig()) -> np.ndarray:
    """One patch as a scanned JPEG pyramid and our reader would deliver it."""
    u = rng.random()
    if u < config.p_lossless:
        return img
    quality = int(rng.integers(config.quality[0], config.quality[1] + 1))
    sub = SUBSAMPLING[int(rng.integers(len(SUBSAMPLING)))]
    offset = (int(rng.integers(8)), int(rng.integers(8)))
    h, w = img.shape[:2]
    if u < config.p_lossless + config.p_finer_level:
        s = rng.uniform(1.25, 2.5)
        big = resize_rgb(img, (round(w * s), round(h * s)))
        return resize_rgb(jpeg_roundtrip(big, quality, sub, offset), (w, h))
    return jpeg_roundtrip(img, quality, sub, offset)


def acquire_batch(images: np.ndarray, rng: np.random.Generator, config: AcquisitionConfig = AcquisitionConfig()) -> np.ndarray:
    """:func:`acquire` over a uint8 batch (n, h, w, 3)."""
    return np.stack([acquire(im, rng, config) for im in images]) if len(images) else images


def jpeg_batch(images: np.ndarray, quality: int, seed: int = 0) -> np.ndarray:
    """A fixed JPEG round trip (4:2:0, block offset drawn from ``seed``) of a uint8 batch, for evaluation."""
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, 8, size=(len(images), 2))
    return np.stack([jpeg_roundtrip(im, quality, 2, (int(o[0]), int(o[1]))) for im, o in zip(images, offsets, strict=True)]) \
        if len(images) else images


def augment_batch(images: np.ndarray, gen: torch.Generator, rng: np.random.Generator,
                  device: torch.device, acquisition: AcquisitionConfig | None = AcquisitionConfig()) -> torch.Tensor:
    """uint8 patches (n, h, w, 3) -> augmented float batch (n, 3, h, w) in [0, 1] on ``device``.

    Stain and geometry first (they belong to the tissue), then acquisition (the scanner's JPEG
    and the reader's resampling act on the stained tissue).
    """
    x = stain(dihedral(to_float(images, device), gen), gen)
    if acquisition is None:
        return x
    u8 = (x.permute(0, 2, 3, 1) * 255).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
    return to_float(acquire_batch(u8, rng, acquisition), device)
