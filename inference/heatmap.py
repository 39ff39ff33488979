"""The heatmap: IDC probabilities on the stride grid, its geometry, colour maps, save/load."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from inference.patches import PatchGrid

#: Colour maps as anchor colours from probability 0 to 1 (linearly interpolated).
COLORMAPS: dict[str, list[tuple[int, int, int]]] = {
    "inferno": [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)],
    "viridis": [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
    "coolwarm": [(59, 76, 192), (141, 176, 254), (221, 221, 221), (244, 154, 123), (180, 4, 38)],
    "jet": [(0, 0, 143), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (128, 0, 0)],
}


def colormap_lut(name: str, n: int = 256) -> np.ndarray:
    """(n, 3) uint8 lookup table of a colour map."""
    anchors = np.asarray(COLORMAPS[name], np.float64)
    x = np.linspace(0, 1, len(anchors))
    t = np.linspace(0, 1, n)
    return np.stack([np.interp(t, x, anchors[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


@dataclass(frozen=True)
class HeatmapInfo:
    """What produced a heatmap: enough to reuse it (cache key) and to place it on the slide."""

    slide_fingerprint: str
    model_id: str
    grid: PatchGrid
    min_tissue: float
    threshold: float = 0.5  # the model's decision threshold (not part of the cache key)

    def key(self) -> str:
        d = asdict(self)
        d.pop("threshold")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]



class Heatmap:
    """IDC probability per heatmap cell (rows, cols); NaN where nothing was computed."""

    def __init__(self, info: HeatmapInfo, tissue: np.ndarray) -> None:
        self.info = info
        rows, cols = info.grid.cell_shape
        self.sum = np.zeros((rows, cols), np.float64)
        self.count = np.zeros((rows, cols), np.int32)
        self.tissue = tissue  # (patch rows, patch cols) bool: patches to compute
        self.patch_done = np.zeros(tissue.shape, bool)
        self.patch_prob = np.full(tissue.shape, np.nan, np.float32)
        self._prob: np.ndarray | None = None

    @property
    def grid(self) -> PatchGrid:
        return self.info.grid

    @property
    def prob(self) -> np.ndarray:
        """(rows, cols) float32 mean probability of the patches covering each cell, NaN if none."""
        if self._prob is None:
            with np.errstate(invalid="ignore", divide="ignore"):
                self._prob = np.where(self.count > 0, self.sum / np.maximum(self.count, 1), np.nan).astype(np.float32)
        return self._prob

    @property
    def computed(self) -> np.ndarray:
        return self.count > 0

    @property
    def tissue_cells(self) -> np.ndarray:
        """(rows, cols) bool over heatmap cells: covered by at least one tissue patch."""
        k = self.grid.k
        t = self.tissue
        out = np.zeros(self.grid.cell_shape, bool)
        for dr in range(k):
            for dc in range(k):
                out[dr : dr + t.shape[0], dc : dc + t.shape[1]] |= t
        return out

    @property
    def complete(self) -> bool:
        return bool(self.patch_done[self.tissue].all())

    def add(self, rows: np.ndarray, cols: np.ndarray, probs: np.ndarray) -> tuple[int, int, int, int]:
        """Add patch results; returns the changed cell block (row0, col0, row1, col1), exclusive."""
        k = self.grid.k
        self._prob = None
        self.patch_prob[rows, cols] = probs
        self.patch_done[rows, cols] = True
        for dr in range(k):
            for dc in range(k):
                np.add.at(self.sum, (rows + dr, cols + dc), probs)
                np.add.at(self.count, (rows + dr, cols + dc), 1)
        return int(rows.min()), int(cols.min()), int(rows.max()) + k, int(cols.max()) + k

    def to_rgba(self, colormap: str = "inferno", threshold: float = 0.0, alpha: int = 255) -> np.ndarray:
        """RGBA uint8 (rows, cols, 4), one pixel per cell; transparent below ``threshold``."""
        p = self.prob
        lut = colormap_lut(colormap)
        idx = np.clip(np.nan_to_num(p, nan=0.0) * 255, 0, 255).astype(np.uint8)
        out = np.zeros((*p.shape, 4), np.uint8)
        out[..., :3] = lut[idx]
        shown = np.isfinite(p) & (np.nan_to_num(p, nan=-1.0) >= threshold)
        out[..., 3] = np.where(shown, alpha, 0)
        return out

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an .npz atomically (geometry in level-0 px, no pickled objects)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        g = self.grid
        meta = {**asdict(self.info), "cell_l0": g.stride_l0, "patch_l0": g.patch_l0,
                "frame": "level-0 pixels; cell (row, col) covers [col*cell_l0, (col+1)*cell_l0) in x"}
        tmp = path.with_name(path.name + ".part.npz")
        np.savez_compressed(
            tmp, prob=self.prob, computed=self.computed, sum=self.sum, count=self.count,
            tissue=self.tissue, patch_done=self.patch_done, patch_prob=self.patch_prob,
            meta=np.array(json.dumps(meta)),
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Heatmap:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            info = HeatmapInfo(meta["slide_fingerprint"], meta["model_id"], PatchGrid(**meta["grid"]),
                               meta["min_tissue"], meta.get("threshold", 0.5))
            hm = cls(info, z["tissue"])
            hm.sum, hm.count, hm._prob = z["sum"], z["count"], None
            hm.patch_done, hm.patch_prob = z["patch_done"], z["patch_prob"]
        return hm


def cache_path(info: HeatmapInfo) -> Path:
    """Where a finished heatmap for these inputs is kept in the per-user cache."""
    base = Path(os.environ.get("IDC_VIEWER_CACHE", Path.home() / ".cache" / "idc-viewer"))
    return base / "heatmaps" / f"{info.slide_fingerprint}-{info.key()}.npz"
