"""Slide-level evaluation: run the whole-slide pipeline, compare its cells with ground truth.

This is how a lab checks a model on its own annotated slides before trusting it, and how the
shipped model's threshold and context neighbourhood are chosen (on validation slides rebuilt as
JPEG pyramids, as a pathologist will see them, not on lossless patches).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from inference import metrics as M
from inference.context import ThresholdAdapt, logit
from inference.heatmap import Heatmap
from inference.model import LoadedModel
from inference.predict import BatchResult, PredictSettings, plan, predict_slide
from inference.slide import Slide
from inference.truth import Agreement, Truth, agreement, away_from_borders, cell_truth

#: Context neighbourhoods (in cells) tried by calibration; 0 is the per-patch map.
SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0)
#: Slides where IDC covers less than this share of labelled cells are left out of the mean F1.
F1_MIN_IDC = 0.10
METRIC_KEYS = ("auc", "balanced_accuracy", "f1", "sensitivity", "specificity")


@dataclass(frozen=True)
class SlideResult:
    """One slide's agreement with its truth, for the per-patch map and the context map, and for
    the map shown on the cells away from the borders between IDC and non-IDC truth."""

    name: str
    raw: Agreement | None
    context: Agreement | None
    seconds: float
    away_from_borders: Agreement | None = None

    @property
    def shown(self) -> Agreement | None:
        """The agreement of the map the viewer shows by default."""
        return self.context or self.raw

    def as_dict(self) -> dict[str, Any]:
        def one(a: Agreement | None) -> dict[str, Any] | None:
            if a is None:
                return None
            m = a.metrics
            return {"cells": a.cells, "idc_cells": a.idc_cells, "outside_tissue": a.outside_tissue,
                    "ambiguous": a.ambiguous, "threshold": m.threshold,
                    **{k: _finite(getattr(m, k)) for k in METRIC_KEYS}}

        return {"slide": self.name, "seconds": round(self.seconds, 2), "per_patch": one(self.raw),
                "context": one(self.context), "away_from_borders": one(self.away_from_borders)}


def _finite(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 4)


def compute_heatmap(slide: Slide, model: LoadedModel, device: torch.device | str = "cpu",
                    settings: PredictSettings | None = None,
                    progress: Callable[[BatchResult], None] | None = None) -> Heatmap:
    """The complete heatmap of a slide (no cache: evaluation always runs the pipeline)."""
    settings = settings or PredictSettings()
    heatmap = plan(slide, model, settings)
    for batch in predict_slide(slide, model, heatmap, device, settings):
        if progress is not None:
            progress(batch)
    return heatmap


def evaluate_heatmap(name: str, heatmap: Heatmap, truth: Truth, seconds: float = 0.0) -> SlideResult:
    """Agreement of a complete heatmap with truth, for both maps the viewer can show."""
    labels, ambiguous = cell_truth(heatmap.grid, truth)
    show = heatmap.context
    heatmap.context = False
    raw = agreement(heatmap, labels, ambiguous)
    ctx = None
    if heatmap.has_context:
        heatmap.context = True
        ctx = agreement(heatmap, labels, ambiguous)
    heatmap.context = show
    inner = agreement(heatmap, away_from_borders(labels), ambiguous)
    return SlideResult(name, raw, ctx, seconds, inner)


def summary(results: Sequence[SlideResult], which: str = "shown") -> dict[str, Any]:
    """Means over slides: AUC and balanced accuracy over slides with both classes, F1 over
    slides where IDC covers at least :data:`F1_MIN_IDC` of the labelled cells."""
    rows = [getattr(r, which) for r in results]
    rows = [a for a in rows if a is not None and a.cells]
    both = [a for a in rows if 0 < a.idc_cells < a.cells]
    f1_rows = [a for a in both if a.idc_cells / a.cells >= F1_MIN_IDC]

    def mean(items: list[Agreement], key: str) -> float | None:
        vals = [getattr(a.metrics, key) for a in items]
        vals = [v for v in vals if math.isfinite(v)]
        return round(float(np.mean(vals)), 4) if vals else None

    return {
        "slides": len(rows), "slides_with_both_classes": len(both), "slides_for_f1": len(f1_rows),
        "cells": int(sum(a.cells for a in rows)),
        "auc": mean(both, "auc"), "balanced_accuracy": mean(both, "balanced_accuracy"),
        "f1": mean(f1_rows, "f1"), "sensitivity": mean(both, "sensitivity"),
        "specificity": mean(both, "specificity"),
    }


@dataclass(frozen=True)
class Calibration:
    """The context neighbourhood and thresholds chosen on validation slides, with the table."""

    sigma: float
    threshold: float  # of the per-patch map
    context_threshold: float  # of the context map (equal to threshold when sigma is 0)
    adapt: ThresholdAdapt | None  # thresholds follow each slide's scores; None: fixed
    table: list[dict[str, Any]]


#: What calibration tries: fixed thresholds, and thresholds that follow one of these percentiles
#: of the slide's per-patch logits with one of these slopes.
THRESHOLDS = np.round(np.linspace(0.02, 0.98, 97), 2)
PERCENTILES = (75.0, 90.0)
SLOPES = np.round(np.arange(0.0, 1.201, 0.05), 2)


@dataclass(frozen=True)
class _Slide:
    y: np.ndarray  # labels of the compared cells
    z: np.ndarray  # logits of the map tried on those cells (outside tissue: probability 0)
    raw: np.ndarray  # the per-patch map, which an adaptive threshold reads


def _slides(heatmaps: Sequence[Heatmap], labels: Sequence[np.ndarray]) -> list[_Slide]:
    """The slides with both classes, each with its compared cells (as :func:`agreement` does)."""
    out = []
    for hm, lab in zip(heatmaps, labels, strict=True):
        prob = hm.prob
        computed = np.isfinite(prob)
        use = (lab >= 0) & (computed | ~hm.tissue_cells)
        y = lab[use].astype(bool)
        if 0 < y.sum() < len(y):
            out.append(_Slide(y, logit(np.where(computed, prob, 0.0)[use]), hm.raw_prob))
    return out


def _bac_grid(slides: Sequence[_Slide], shifts: np.ndarray) -> np.ndarray:
    """Balanced accuracy of every slide for every (slope, threshold): (slides, slopes, thresholds).

    A slide's threshold is ``logit(t) + slope * shift`` (shift 0: the fixed threshold t).
    """
    out = np.empty((len(slides), len(SLOPES), len(THRESHOLDS)))
    base = logit(THRESHOLDS)[None, :]
    for i, (sl, shift) in enumerate(zip(slides, shifts, strict=True)):
        t = base + SLOPES[:, None] * shift
        pos, neg = np.sort(sl.z[sl.y]), np.sort(sl.z[~sl.y])
        sens = 1 - np.searchsorted(pos, t, "left") / len(pos)  # called IDC: z >= t
        spec = np.searchsorted(neg, t, "left") / len(neg)
        out[i] = 0.5 * (sens + spec)
    return out


def _best(bac: np.ndarray) -> tuple[int, float, float]:
    """The best flat (slope, threshold) index on all slides, its mean, and the leave-one-slide-out
    mean: each slide judged at the setting chosen on the others (how calibration is compared)."""
    n = len(bac)
    flat = bac.reshape(n, -1)
    total = flat.sum(axis=0)
    j = int(np.argmax(total))
    if n == 1:
        return j, float(total[j]), float(total[j])
    loo = [flat[i, int(np.argmax(total - flat[i]))] for i in range(n)]
    return j, float(total[j] / n), float(np.mean(loo))


def calibrate(heatmaps: Sequence[Heatmap], truths: Sequence[Truth], sigmas: Sequence[float] = SIGMAS) -> Calibration:
    """Choose the context neighbourhood and the (fixed or slide-adaptive) threshold.

    Every candidate is scored by the mean per-slide balanced accuracy left one slide out, so an
    adaptive threshold, which has more to fit, wins only where it holds on slides it did not see.
    Only slides with both classes count; each slide weighs the same, as each patient does.
    """
    labels = [cell_truth(hm.grid, t)[0] for hm, t in zip(heatmaps, truths, strict=True)]
    raw_slides = _slides(heatmaps, labels)
    if not raw_slides:
        raise ValueError("No validation slide holds both IDC and non-IDC cells; calibration needs some.")
    adapts = {}
    for q in PERCENTILES:
        values = np.array([np.percentile(logit(s.raw[np.isfinite(s.raw)]), q) for s in raw_slides])
        adapts[q] = ThresholdAdapt(q, 1.0, float(np.median(values)), float(values.min()), float(values.max()))
    shifts = {q: np.array([a.shift(s.raw) for s in raw_slides]) for q, a in adapts.items()}
    fixed = np.zeros(len(raw_slides))
    table, grids = [], {}
    for sigma in sigmas:
        slides = _slides([_with_sigma(hm, sigma) for hm in heatmaps], labels)  # the same slides, in order
        auc = float(np.nanmean([M.roc_auc(s.y.astype(np.int64), s.z) for s in slides]))
        for q in (None, *PERCENTILES):
            grid = _bac_grid(slides, fixed if q is None else shifts[q])
            if q is None:
                grid = grid[:, :1]  # slope 0 only
            grids[sigma, q] = grid
            j, mean, loo = _best(grid)
            slope_i, t_i = np.unravel_index(j, grid.shape[1:])
            table.append({"sigma": sigma, "percentile": q, "slope": float(SLOPES[slope_i]),
                          "threshold": float(THRESHOLDS[t_i]), "balanced_accuracy": round(mean, 4),
                          "loo_balanced_accuracy": round(loo, 4), "auc": round(auc, 4), "slides": len(slides)})
    best = max(table, key=lambda r: r["loo_balanced_accuracy"])  # first of equals: simplest
    q, slope_i = best["percentile"], int(np.searchsorted(SLOPES, best["slope"]))
    adapt = replace(adapts[q], slope=best["slope"]) if q is not None and best["slope"] else None
    raw_grid = grids.get((0.0, q))
    raw_t = float(THRESHOLDS[int(np.argmax(raw_grid[:, slope_i].sum(axis=0)))]) if raw_grid is not None \
        else best["threshold"]
    return Calibration(best["sigma"], raw_t, best["threshold"], adapt, table)


def _with_sigma(heatmap: Heatmap, sigma: float) -> Heatmap:
    """The same computed heatmap seen through another context neighbourhood."""
    hm = Heatmap(replace(heatmap.info, context_sigma=sigma), heatmap.tissue)
    hm.sum, hm.count = heatmap.sum, heatmap.count
    hm.patch_done, hm.patch_prob = heatmap.patch_done, heatmap.patch_prob
    return hm


def timed(fn: Callable[[], Heatmap]) -> tuple[Heatmap, float]:
    t = time.perf_counter()
    hm = fn()
    return hm, time.perf_counter() - t
