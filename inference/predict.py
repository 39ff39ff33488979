"""Whole-slide prediction as a generator of batch results.

Large blocks of patches are read once from the best pyramid level at the model's resolution and
cut into patches, each with the model's margin of slide around it (ModelMeta.margin), or, for a
scan network (inference.efficientnet.ScanLite0), scored as one region whose cells each get
exactly their patch's prediction; reader threads prefetch blocks while the model runs; batches
are yielded as they finish. Closing the generator stops within one batch and shuts the readers
down.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from inference.domain import patch_stats
from inference.efficientnet import ScanLite0
from inference.heatmap import Heatmap, HeatmapInfo
from inference.model import LoadedModel, inference_copy, normalise, to_float
from inference.patches import PatchGrid, centre
from inference.slide import Slide
from inference.tissue import MIN_TISSUE, patch_tissue

log = logging.getLogger(__name__)

#: Patches per block side: one read of up to 16 x 16 patches.
BLOCK = 16


@dataclass(frozen=True)
class PredictSettings:
    stride_px: int | None = None
    batch_size: int | None = None  # None: 32 on the CPU (its caches: 1.15x 64 for PCam patches), 256 on a GPU
    first_batch: int = 16  # a small first batch puts cells on screen quickly
    min_tissue: float = MIN_TISSUE
    readers: int = 2
    prefetch: int = 6


@dataclass(frozen=True)
class BatchResult:
    """Patches just computed: grid indices, probabilities, the changed cell block, progress."""

    rows: np.ndarray
    cols: np.ndarray
    probs: np.ndarray
    block: tuple[int, int, int, int]
    done: int
    total: int
    elapsed_s: float

    @property
    def patches_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float:
        rate = self.patches_per_s
        return (self.total - self.done) / rate if rate > 0 else math.inf


def heatmap_info(slide: Slide, model: LoadedModel, settings: PredictSettings) -> HeatmapInfo:
    """What a heatmap of this slide by this model would be (its cache key); reads no pixels."""
    meta = model.meta
    grid = PatchGrid.build(slide.dimensions, slide.mpp, meta.mpp, meta.patch_size, settings.stride_px)
    return HeatmapInfo(slide.fingerprint(), model.model_id, grid, settings.min_tissue, meta.threshold,
                       meta.context_sigma, meta.context_threshold, meta.adapt, meta.call_policy,
                       meta.positive_class)


def plan(slide: Slide, model: LoadedModel, settings: PredictSettings) -> Heatmap:
    """An empty heatmap for this slide and model, with its tissue mask computed."""
    info = heatmap_info(slide, model, settings)
    return Heatmap(info, patch_tissue(slide, info.grid, settings.min_tissue))


def _blocks(todo: np.ndarray) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Blocks of BLOCK x BLOCK patches with work: (row0, col0, rows, cols) in reading order."""
    rows, cols = todo.shape
    out = []
    for r0 in range(0, rows, BLOCK):
        for c0 in range(0, cols, BLOCK):
            rr, cc = np.nonzero(todo[r0 : r0 + BLOCK, c0 : c0 + BLOCK])
            if len(rr):
                out.append((r0, c0, rr + r0, cc + c0))
    return out


def _read_region(slide: Slide, grid: PatchGrid, r0: int, c0: int, rows: np.ndarray, cols: np.ndarray,
                 margin: int = 0) -> np.ndarray:
    """Read the slide under one block's cells, from cell (r0, c0) to the last of (rows, cols),
    at the model's resolution with ``margin`` px around: (h, w, 3) uint8. Outside the slide is
    its background, as on the rebuilt training slides."""
    p, s, m = grid.patch_px, grid.stride_px, margin
    w_px = (int(cols.max()) - c0) * s + p + 2 * m
    h_px = (int(rows.max()) - r0) * s + p + 2 * m
    x0, y0, _, _ = grid.patch_box(r0, c0)
    x0, y0 = x0 - m * grid.scale, y0 - m * grid.scale
    return slide.read_box((x0, y0, x0 + w_px * grid.scale, y0 + h_px * grid.scale), (w_px, h_px))


def _cut(region: np.ndarray, stride: int, rows: np.ndarray, cols: np.ndarray, side: int, offset: int = 0) -> np.ndarray:
    """The (side x side) squares of a region at cells (rows, cols) counted from its first cell,
    ``offset`` px in: (n, side, side, 3) uint8."""
    out = np.empty((len(rows), side, side, 3), np.uint8)
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        out[i] = region[offset + r * stride : offset + r * stride + side, offset + c * stride : offset + c * stride + side]
    return out


def _read_block(slide: Slide, grid: PatchGrid, r0: int, c0: int, rows: np.ndarray, cols: np.ndarray,
                margin: int = 0) -> np.ndarray:
    """Read one block at the model's resolution and cut its patches, each with ``margin`` px of
    the slide around it: (n, p + 2 margin, p + 2 margin, 3) uint8."""
    region = _read_region(slide, grid, r0, c0, rows, cols, margin)
    return _cut(region, grid.stride_px, rows - r0, cols - c0, grid.patch_px + 2 * margin)


def read_patches(slide: Slide, grid: PatchGrid, rows: np.ndarray, cols: np.ndarray, margin: int = 0) -> np.ndarray:
    """Patches of grid cells (rows[i], cols[i]) with ``margin`` px around them, read block by
    block, in input order: (n, p + 2 margin, p + 2 margin, 3) uint8."""
    todo = np.zeros(grid.patch_shape, bool)
    todo[rows, cols] = True
    index = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols, strict=True))}
    side = grid.patch_px + 2 * margin
    out = np.empty((len(rows), side, side, 3), np.uint8)
    for r0, c0, rr, cc in _blocks(todo):
        block = _read_block(slide, grid, r0, c0, rr, cc, margin)
        for img, r, c in zip(block, rr, cc, strict=True):
            out[index[(int(r), int(c))]] = img
    return out


def predict_slide(
    slide: Slide,
    model: LoadedModel,
    heatmap: Heatmap,
    device: torch.device | str = "cpu",
    settings: PredictSettings | None = None,
) -> Iterator[BatchResult]:
    """Compute every tissue patch not yet done in ``heatmap``, yielding after each batch."""
    settings = settings or PredictSettings()
    device = torch.device(device)
    batch_size = settings.batch_size or (256 if device.type == "cuda" else 32)
    grid = heatmap.grid
    margin = model.meta.margin
    writer = heatmap.claim()
    todo = heatmap.tissue & ~heatmap.patch_done
    blocks = _blocks(todo)
    total = int(heatmap.tissue.sum())
    done = int((heatmap.tissue & heatmap.patch_done).sum())
    net = inference_copy(model.net.eval(), device)
    # A scan network scores a whole block's region at once, each block of cells seen once
    # (inference.efficientnet.ScanLite0); on an overlapping grid its blocks would not be cells.
    scanning = isinstance(net, ScanLite0) and grid.stride_px == grid.patch_px
    read = _read_region if scanning else _read_block
    cuda = device.type == "cuda"
    pool = ThreadPoolExecutor(max_workers=settings.readers, thread_name_prefix="predict-read")
    pending: deque[tuple[Future[np.ndarray], int, int, np.ndarray, np.ndarray]] = deque()
    t0 = time.perf_counter()
    next_block = 0

    def fill() -> None:
        nonlocal next_block
        while next_block < len(blocks) and len(pending) < settings.prefetch:
            r0, c0, rr, cc = blocks[next_block]
            pending.append((pool.submit(read, slide, grid, r0, c0, rr, cc, margin), r0, c0, rr, cc))
            next_block += 1

    def score(images: np.ndarray, forward: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """Probabilities of ``forward``'s logits on (n, h, w, 3) uint8 images."""
        with torch.inference_mode():
            x = normalise(to_float(images, device), model.meta).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = forward(x)
            return torch.sigmoid(logits.float()).cpu().numpy()

    def scan(region: np.ndarray, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
        cells = torch.zeros((int(rr.max()) + 1, int(cc.max()) + 1), dtype=torch.bool, device=device)
        cells[rr, cc] = True
        return score(region[None], lambda x: net.scan(x, cells)[0, rr, cc])

    def patch_batches() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Batches of patches cut from the blocks: (rows, cols, probabilities, cell colours)."""
        buf_img: list[np.ndarray] = []
        buf_r: list[np.ndarray] = []
        buf_c: list[np.ndarray] = []
        buffered = scored = 0
        while pending or buffered:
            want = min(settings.first_batch if scored == 0 else batch_size, batch_size)
            while pending and buffered < want:
                fut, _r0, _c0, rr, cc = pending.popleft()
                buf_img.append(fut.result())
                buf_r.append(rr)
                buf_c.append(cc)
                buffered += len(rr)
                fill()
            images = np.concatenate(buf_img)
            rows = np.concatenate(buf_r)
            cols = np.concatenate(buf_c)
            n = min(want, len(rows))
            scored += n
            yield rows[:n], cols[:n], score(images[:n], net), patch_stats(centre(images[:n], margin))
            buf_img, buf_r, buf_c = [images[n:]], [rows[n:]], [cols[n:]]
            buffered = len(rows) - n
            if buffered == 0:
                buf_img, buf_r, buf_c = [], [], []

    def scanned_blocks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Each block's region scanned at once: (rows, cols, probabilities, cell colours)."""
        while pending:
            fut, r0, c0, rr, cc = pending.popleft()
            region = fut.result()
            fill()
            cells = _cut(region, grid.stride_px, rr - r0, cc - c0, grid.patch_px, margin)  # the cells' own colours
            yield rr, cc, scan(region, rr - r0, cc - c0), patch_stats(cells)

    try:
        fill()
        for rows, cols, probs, stats in scanned_blocks() if scanning else patch_batches():
            block = heatmap.add(rows, cols, probs, writer, stats)
            if block is None:
                return  # another run took this heatmap over
            done += len(rows)
            yield BatchResult(rows, cols, probs, block, done, total, time.perf_counter() - t0)
    finally:
        for fut, *_ in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
