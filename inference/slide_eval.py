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
from inference.heatmap import Heatmap
from inference.model import LoadedModel
from inference.predict import BatchResult, PredictSettings, plan, predict_slide
from inference.slide import Slide
from inference.truth import Agreement, Truth, agreement, cell_truth

#: Context neighbourhoods (in cells) tried by calibration; 0 is the per-patch map.
SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0)
#: Slides where IDC covers less than this share of labelled cells are left out of the mean F1.
F1_MIN_IDC = 0.10
METRIC_KEYS = ("auc", "balanced_accuracy", "f1", "sensitivity", "specificity")


@dataclass(frozen=True)
class SlideResult:
    """One slide's agreement with its truth, for the per-patch map and the context map."""

    name: str
    raw: Agreement | None
    context: Agreement | None
    seconds: float

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
                "context": one(self.context)}


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
    return SlideResult(name, raw, ctx, seconds)


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
    table: list[dict[str, Any]]


def _slide_scores(heatmaps: Sequence[Heatmap], labels: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for hm, lab in zip(heatmaps, labels, strict=True):
        prob = hm.prob
        computed = np.isfinite(prob)
        use = (lab >= 0) & (computed | ~hm.tissue_cells)
        y = lab[use].astype(np.int64)
        if 0 < y.sum() < len(y):
            out.append((y, np.where(computed, prob, 0.0)[use]))
    return out


def _mean_bac(scores: list[tuple[np.ndarray, np.ndarray]], t: float) -> float:
    return float(np.mean([M.compute(y, p, t).balanced_accuracy for y, p in scores]))


def calibrate(heatmaps: Sequence[Heatmap], truths: Sequence[Truth], sigmas: Sequence[float] = SIGMAS) -> Calibration:
    """Choose sigma and threshold maximising the mean per-slide balanced accuracy.

    Only slides with both classes count; each slide weighs the same, as each patient does.
    """
    labels = [cell_truth(hm.grid, t)[0] for hm, t in zip(heatmaps, truths, strict=True)]
    grid = np.round(np.linspace(0.02, 0.98, 97), 2)
    table, best = [], None
    for sigma in sigmas:
        tried = [_with_sigma(hm, sigma) for hm in heatmaps]
        scores = _slide_scores(tried, labels)
        if not scores:
            raise ValueError("No validation slide holds both IDC and non-IDC cells; calibration needs some.")
        bacs = [_mean_bac(scores, float(t)) for t in grid]
        i = int(np.argmax(bacs))
        auc = float(np.nanmean([M.roc_auc(y, p) for y, p in scores]))
        row = {"sigma": sigma, "threshold": float(grid[i]), "balanced_accuracy": round(bacs[i], 4),
               "auc": round(auc, 4), "slides": len(scores)}
        table.append(row)
        if best is None or row["balanced_accuracy"] > best["balanced_accuracy"] + 1e-9:
            best = row
    assert best is not None
    raw_t = next(r["threshold"] for r in table if r["sigma"] == 0) if 0.0 in sigmas else best["threshold"]
    return Calibration(best["sigma"], raw_t, best["threshold"], table)


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
