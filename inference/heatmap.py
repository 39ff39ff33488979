"""The heatmap: IDC probabilities on the stride grid, its geometry, colour maps, save/load."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.atomic import atomic_path
from inference.calls import NOT_FOUND, SlideCallPolicy
from inference.context import ThresholdAdapt, context_prob, context_radius
from inference.domain import N_STATS, slide_score
from inference.patches import PatchGrid

log = logging.getLogger(__name__)

#: Colour maps as anchor colours from probability 0 to 1 (linearly interpolated).
#: The first is the default: ColorBrewer YlOrRd, light yellow to dark red, so that high is
#: unmistakable on pink H&E (inferno at 0-1 painted all stroma purple and tumour a khaki wash).
COLORMAPS: dict[str, list[tuple[int, int, int]]] = {
    "yellow-red": [(255, 255, 204), (255, 237, 160), (254, 217, 118), (254, 178, 76), (253, 141, 60),
                   (252, 78, 42), (227, 26, 28), (189, 0, 38), (128, 0, 38)],
    "inferno": [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)],
    "viridis": [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
    "coolwarm": [(59, 76, 192), (141, 176, 254), (221, 221, 221), (244, 154, 123), (180, 4, 38)],
    "jet": [(0, 0, 143), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (128, 0, 0)],
}


DEFAULT_COLORMAP = next(iter(COLORMAPS))


def colormap_lut(name: str, n: int = 256) -> np.ndarray:
    """(n, 3) uint8 lookup table of a colour map."""
    anchors = np.asarray(COLORMAPS[name], np.float64)
    x = np.linspace(0, 1, len(anchors))
    t = np.linspace(0, 1, n)
    return np.stack([np.interp(t, x, anchors[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


#: Bumped when the cell layout of a grid changes, so older cached heatmaps are not reused
#: (2: partial cells at the right and bottom edges are computed).
GRID_VERSION = 2


@dataclass(frozen=True)
class HeatmapInfo:
    """What produced a heatmap: enough to reuse it (cache key) and to place it on the slide."""

    slide_fingerprint: str
    model_id: str
    grid: PatchGrid
    min_tissue: float
    threshold: float = 0.5  # the model's decision threshold on the per-patch map (not in the key)
    context_sigma: float = 0.0  # neighbourhood of the context map, in cells (0: none)
    context_threshold: float | None = None  # decision threshold on the context map (not in the key)
    threshold_adapt: ThresholdAdapt | None = None  # thresholds follow the slide's scores (not in the key)
    slide_call: SlideCallPolicy | None = None  # the slide score and call (inference.calls; not in the key)
    positive: str = "IDC"  # the model's name for what it finds: regions and reports say it (not in the key)

    def key(self) -> str:
        d = {**asdict(self), "grid_version": GRID_VERSION}
        for name in ("threshold", "context_threshold", "threshold_adapt", "slide_call", "positive"):
            d.pop(name)
        if not d["context_sigma"]:
            d.pop("context_sigma")  # keys of heatmaps without context are unchanged
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]


class Heatmap:
    """IDC probability per heatmap cell (rows, cols); NaN where nothing was computed.

    ``prob`` and ``threshold`` are those of the map shown: the context-aware map when the model
    has one and ``context`` is on (the default), else the raw per-patch map (``raw_prob``). Every
    consumer (colours, hover, regions, measurements, agreement) reads ``prob`` and so uses what
    the pathologist sees. Which cells are *called* is :attr:`called`, the one owner of the calls:
    cells at or above the threshold, and none on a slide whose slide score says no IDC
    (inference.calls).

    One heatmap per job: the inference thread adds batches, views read it. ``add`` and the
    derived maps run under one lock, and derived maps are replaced, never changed in place, so
    a reader always sees a consistent map.
    """

    def __init__(self, info: HeatmapInfo, tissue: np.ndarray) -> None:
        self.info = info
        rows, cols = info.grid.cell_shape
        self.sum = np.zeros((rows, cols), np.float64)
        self.count = np.zeros((rows, cols), np.int32)
        self.tissue = tissue  # (patch rows, patch cols) bool: patches to compute
        self.patch_done = np.zeros(tissue.shape, bool)
        self.patch_prob = np.full(tissue.shape, np.nan, np.float32)
        #: (patch rows, patch cols, 9) colour statistics of each computed patch (inference.domain)
        self.patch_stats = np.full((*tissue.shape, N_STATS), np.nan, np.float32)
        self._prob: np.ndarray | None = None
        self._context_prob: np.ndarray | None = None
        self._shift: float | None = None  # of an adaptive threshold, from the cells computed so far
        self._slide_score: tuple[float | None] | None = None  # from the cells computed so far
        self._context = True
        self._lock = threading.RLock()
        self._writer = 0  # the run allowed to add (see claim)

    @property
    def grid(self) -> PatchGrid:
        return self.info.grid

    @property
    def has_context(self) -> bool:
        """Whether the model defines a context-aware map for this heatmap."""
        return self.info.context_sigma > 0

    @property
    def context(self) -> bool:
        """True when the context-aware map is the one shown."""
        return self._context and self.has_context

    @context.setter
    def context(self, on: bool) -> None:
        self._context = bool(on)

    @property
    def raw_prob(self) -> np.ndarray:
        """(rows, cols) float32 mean probability of the patches covering each cell, NaN if none."""
        with self._lock:
            if self._prob is None:
                with np.errstate(invalid="ignore", divide="ignore"):
                    self._prob = np.where(self.count > 0, self.sum / np.maximum(self.count, 1),
                                          np.nan).astype(np.float32)
            return self._prob

    @property
    def context_map(self) -> np.ndarray:
        """(rows, cols) float32 context-aware map (the raw map for a model without context),
        whichever map is shown."""
        if not self.has_context:
            return self.raw_prob
        with self._lock:
            if self._context_prob is None:
                self._context_prob = context_prob(self.raw_prob, self.info.context_sigma)
            return self._context_prob

    @property
    def prob(self) -> np.ndarray:
        """(rows, cols) float32 probability of the map shown, NaN where not computed."""
        return self.context_map if self.context else self.raw_prob

    @property
    def threshold(self) -> float:
        """The model's decision threshold for the map shown, on this slide.

        With an adaptive threshold it follows the computed cells, so it settles as they arrive.
        """
        base = self.info.threshold
        if self.context and self.info.context_threshold is not None:
            base = self.info.context_threshold
        adapt = self.info.threshold_adapt
        if adapt is None:
            return base
        with self._lock:
            if self._shift is None:
                self._shift = adapt.shift(self.raw_prob)
            return adapt.threshold_shifted(base, self._shift)

    @property
    def slide_score(self) -> float | None:
        """The calibrated slide score (inference.calls) of the cells computed so far, on the map
        the policy was fitted on (the context map when the model has one, whatever is shown);
        None without a policy or a computed cell."""
        policy = self.info.slide_call
        if policy is None:
            return None
        with self._lock:
            if self._slide_score is None:
                self._slide_score = (policy.score(self.context_map),)
            return self._slide_score[0]

    def slide_call(self, out_of_domain: bool = False) -> str | None:
        """FOUND, NOT_FOUND or UNCERTAIN (inference.calls), or None when the model has no policy."""
        policy = self.info.slide_call
        return None if policy is None else policy.call(self.slide_score, out_of_domain)

    @property
    def call_threshold(self) -> float:
        """The probability at or above which a cell is called on this slide: :attr:`threshold`,
        or infinity (nothing is called) when the slide score says no IDC."""
        if self.slide_call() == NOT_FOUND:
            return float("inf")
        return self.threshold

    @property
    def called(self) -> np.ndarray:
        """(rows, cols) bool: the cells the map shown calls IDC on this slide."""
        return np.nan_to_num(self.prob, nan=-np.inf) >= self.call_threshold

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

    def domain_score(self, domain: dict[str, Any]) -> float | None:
        """Distance of the computed patches' colour from the training domain (None if unknown)."""
        done = self.patch_stats[self.patch_done]
        return slide_score(done[np.isfinite(done).all(axis=1)], domain)

    @property
    def complete(self) -> bool:
        return bool(self.patch_done[self.tissue].all())

    def claim(self) -> int:
        """Make the caller the one run that adds to this heatmap; an earlier run's adds are dropped.

        A stopped job winds down within a batch on its own thread while a new job may already
        resume the same heatmap: claiming keeps its last batch from landing twice.
        """
        with self._lock:
            self._writer += 1
            return self._writer

    def add(self, rows: np.ndarray, cols: np.ndarray, probs: np.ndarray, writer: int | None = None,
            stats: np.ndarray | None = None) -> tuple[int, int, int, int] | None:
        """Add patch results; returns the changed cell block (row0, col0, row1, col1), exclusive.

        With ``writer`` (from :meth:`claim`), a superseded run's results are dropped (None).
        """
        k = self.grid.k
        with self._lock:
            if writer is not None and writer != self._writer:
                return None
            self._prob = self._context_prob = self._shift = self._slide_score = None
            self.patch_prob[rows, cols] = probs
            self.patch_done[rows, cols] = True
            if stats is not None:
                self.patch_stats[rows, cols] = stats
            for dr in range(k):
                for dc in range(k):
                    np.add.at(self.sum, (rows + dr, cols + dc), probs)
                    np.add.at(self.count, (rows + dr, cols + dc), 1)
        # The context map changes the neighbours too: widen the block by the kernel's reach.
        reach = context_radius(self.info.context_sigma) if self.context else 0
        n_rows, n_cols = self.count.shape
        return (max(0, int(rows.min()) - reach), max(0, int(cols.min()) - reach),
                min(n_rows, int(rows.max()) + k + reach), min(n_cols, int(cols.max()) + k + reach))

    def to_rgba(self, colormap: str = DEFAULT_COLORMAP, threshold: float = 0.0, alpha: int = 255) -> np.ndarray:
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
        g = self.grid
        meta = {**asdict(self.info), "cell_l0": g.stride_l0, "patch_l0": g.patch_l0,
                "frame": "level-0 pixels; cell (row, col) covers [col*cell_l0, (col+1)*cell_l0) in x"}
        with self._lock, atomic_path(path) as tmp:
            _savez(tmp, prob=self.raw_prob, computed=self.computed, sum=self.sum, count=self.count,
                   tissue=self.tissue, patch_done=self.patch_done, patch_prob=self.patch_prob,
                   patch_stats=self.patch_stats, meta=np.array(json.dumps(meta, sort_keys=True)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Heatmap:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            info = HeatmapInfo(meta["slide_fingerprint"], meta["model_id"], PatchGrid(**meta["grid"]),
                               meta["min_tissue"], meta.get("threshold", 0.5),
                               meta.get("context_sigma", 0.0), meta.get("context_threshold"),
                               ThresholdAdapt(**meta["threshold_adapt"]) if meta.get("threshold_adapt") else None,
                               SlideCallPolicy(**meta["slide_call"]) if meta.get("slide_call") else None,
                               meta.get("positive", "IDC"))
            if z["tissue"].shape != info.grid.patch_shape or z["sum"].shape != info.grid.cell_shape:
                raise ValueError(f"{Path(path).name} does not match its grid (written by another version).")
            hm = cls(info, z["tissue"])
            hm.sum, hm.count = z["sum"], z["count"]
            hm.patch_done, hm.patch_prob = z["patch_done"], z["patch_prob"]
            if "patch_stats" in z.files and z["patch_stats"].shape[:2] == hm.tissue.shape:
                hm.patch_stats = z["patch_stats"]
        return hm


def _savez(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """np.savez_compressed with fixed zip timestamps: the same heatmap gives the same bytes
    (cohort runs on Ray and locally are compared byte for byte)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def load_matching(path: Path, info: HeatmapInfo | None = None) -> Heatmap | None:
    """The heatmap in ``path`` if it exists, reads, and was made from ``info`` (any, if None);
    an unreadable file is ignored with a warning in the log."""
    if not path.exists():
        return None
    try:
        hm = Heatmap.load(path)
    except (OSError, ValueError, KeyError):
        log.warning("ignoring unreadable heatmap %s", path, exc_info=True)
        return None
    return hm if info is None or hm.info.key() == info.key() else None


def load_cached(info: HeatmapInfo) -> Heatmap | None:
    """The cached heatmap for these inputs (finished or not), or None; a bad cache file is ignored."""
    return load_matching(cache_path(info), info)


def cache_path(info: HeatmapInfo) -> Path:
    """Where a finished heatmap for these inputs is kept in the per-user cache."""
    base = Path(os.environ.get("IDC_VIEWER_CACHE", Path.home() / ".cache" / "idc-viewer"))
    return base / "heatmaps" / f"{info.slide_fingerprint}-{info.key()}.npz"
