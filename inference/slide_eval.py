"""Slide-level evaluation: run the whole-slide pipeline, compare its calls with ground truth.

This is how a lab checks a model on its own annotated slides before trusting it, and what the
shipped model's calls are chosen by (inference.calibration, on validation slides rebuilt as JPEG
pyramids, as a pathologist will see them, not on lossless patches). A slide with truth is judged
by agreement, F1 and the area called against the area labelled; an IDC-free slide by the share
of its tissue called IDC; both by the slide score and call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from inference import metrics as M
from inference.calibration import F1_MIN_IDC
from inference.calls import FOUND, NOT_FOUND, UNCERTAIN
from inference.heatmap import Heatmap
from inference.model import LoadedModel
from inference.predict import BatchResult, PredictSettings, plan, predict_slide
from inference.slide import Slide
from inference.truth import Agreement, Truth, agreement, away_from_borders, cell_truth

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
    idc_free: bool = False  # rebuilt without its IDC: every cell called is a false call
    called_share: float | None = None  # share of the computed tissue the model calls (map shown)
    slide_score: float | None = None  # calibrated slide score (inference.calls), None without a policy
    slide_call: str | None = None  # FOUND, NOT_FOUND or UNCERTAIN

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

        return {"slide": self.name, "seconds": round(self.seconds, 2), "idc_free": self.idc_free,
                "called_share": _finite(self.called_share), "slide_score": _finite(self.slide_score),
                "slide_call": self.slide_call, "area_ratio": _finite(self.area_ratio),
                "per_patch": one(self.raw), "context": one(self.context),
                "away_from_borders": one(self.away_from_borders)}

    @property
    def area_ratio(self) -> float | None:
        """Cells called over cells labelled IDC (of the compared cells, map shown); None without IDC."""
        a = self.shown
        if a is None or not a.idc_cells:
            return None
        m = a.metrics
        return (m.tp + m.fp) / (m.tp + m.fn)


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


def evaluate_heatmap(name: str, heatmap: Heatmap, truth: Truth, seconds: float = 0.0,
                     idc_free: bool = False) -> SlideResult:
    """Agreement of a complete heatmap with truth, for both maps the viewer can show, with the
    share of tissue called and the slide's score and call (on the map shown by default)."""
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
    computed = int(heatmap.computed.sum())
    share = float(heatmap.called.sum()) / computed if computed else None
    return SlideResult(name, raw, ctx, seconds, inner, idc_free, share, heatmap.slide_score, heatmap.slide_call())


def summary(results: Sequence[SlideResult], which: str = "shown") -> dict[str, Any]:
    """Means over the slides with truth (IDC-free ones are in :func:`calls_summary`): AUC and
    balanced accuracy over slides with both classes, F1 over slides where IDC covers at least
    :data:`F1_MIN_IDC` of the labelled cells."""
    rows = [getattr(r, which) for r in results if not r.idc_free]
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


def calls_summary(results: Sequence[SlideResult]) -> dict[str, Any]:
    """How the model's calls read to a pathologist, on the map shown by default.

    Slides with IDC: median area called over area labelled (all, and those with at least
    :data:`F1_MIN_IDC` IDC); IDC-free slides: mean and largest share of tissue called IDC; both:
    how often a slide with IDC has a higher slide score than an IDC-free one (pair AUC), and the
    slide calls of each kind.
    """
    pos = [r for r in results if not r.idc_free and r.shown is not None and r.shown.idc_cells]
    big = [r for r in pos if r.shown.idc_cells / r.shown.cells >= F1_MIN_IDC]
    free = [r for r in results if r.idc_free and r.called_share is not None]

    def median(vals: list[float | None]) -> float | None:
        v = [x for x in vals if x is not None]
        return round(float(np.median(v)), 4) if v else None

    shares = [r.called_share for r in free]
    out: dict[str, Any] = {
        "slides_with_idc": len(pos), "area_ratio_median": median([r.area_ratio for r in pos]),
        "area_ratio_median_for_f1": median([r.area_ratio for r in big]),
        "idc_free_slides": len(free),
        "idc_free_called_mean": round(float(np.mean(shares)), 4) if shares else None,
        "idc_free_called_max": round(float(np.max(shares)), 4) if shares else None,
        "idc_free_over_8_percent": int(sum(s > 0.08 for s in shares)),
    }
    scored = [r for r in (*pos, *free) if r.slide_score is not None]
    if any(r.idc_free for r in scored) and any(not r.idc_free for r in scored):
        y = np.array([not r.idc_free for r in scored])
        out["slide_score_pair_auc"] = round(M.roc_auc(y, np.array([r.slide_score for r in scored])), 4)
    for kind, rows in (("slides_with_idc", pos), ("idc_free", free)):
        out[f"calls_{kind}"] = {c: sum(r.slide_call == c for r in rows) for c in (FOUND, UNCERTAIN, NOT_FOUND)}
    return out


def timed(fn: Callable[[], Heatmap]) -> tuple[Heatmap, float]:
    t = time.perf_counter()
    hm = fn()
    return hm, time.perf_counter() - t
