"""Choosing a model's calls on validation slides: context, cell threshold and its floor, slide call.

A pathologist judges a map by its calls: IDC where IDC is, the right area, and nothing on tissue
without IDC. So calibration is judged on two kinds of validation slide (rebuilt as JPEG
pyramids, as the viewer meets them): slides with IDC, where the called cells should match the
outlined ones (F1, that is Dice), and IDC-free slides (the same patients' non-IDC tissue alone),
where every called cell is a false call. Each candidate (context neighbourhood, threshold, how
the threshold follows the slide and its floor) is scored by

    (1 - w) x mean F1 over slides with at least F1_MIN_IDC IDC  +  w x mean share of tissue left
    clear over IDC-free slides

and candidates are compared left one slide out (each slide judged at the setting chosen on the
others), so a candidate with more to fit wins only where it holds on slides it was not fitted
on. Balanced accuracy is reported, not chosen by: it weighs one missed IDC cell as much as all
the false ones and so over-calls wherever IDC is rare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from inference import metrics as M
from inference.calls import SlideCallPolicy, fit_policy, raw_score
from inference.context import ThresholdAdapt, context_prob, logit
from inference.heatmap import Heatmap
from inference.truth import Truth, cell_truth

#: Context neighbourhoods (in cells) tried; 0 is the per-patch map.
SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0)
#: Fixed thresholds tried, and thresholds that follow one of these percentiles of the slide's
#: per-patch logits with one of these slopes, with or without a floor at the model's threshold.
THRESHOLDS = np.round(np.linspace(0.02, 0.98, 97), 2)
PERCENTILES = (75.0, 90.0)
SLOPES = np.round(np.arange(0.0, 1.201, 0.05), 2)
FLOORS: tuple[float | None, ...] = (None, 0.0)  # ThresholdAdapt.min_shift
#: Slide scores tried: the mean of a slide's this many most confident cells.
TOP_CELLS = (1, 3, 5, 10, 20)
#: The IDC-free slides' share of the objective.
IDC_FREE_WEIGHT = 0.5
#: Slides where IDC covers less than this share of labelled cells are left out of the mean F1.
F1_MIN_IDC = 0.10


@dataclass(frozen=True)
class Calibration:
    """What calibration chose, with the table of every candidate's best setting."""

    sigma: float
    threshold: float  # of the per-patch map
    context_threshold: float  # of the context map (equal to threshold when sigma is 0)
    adapt: ThresholdAdapt | None  # thresholds follow each slide's scores; None: fixed
    slide_call: SlideCallPolicy | None  # None without IDC-free slides
    table: list[dict[str, Any]]
    slide_scores: dict[str, Any]  # pair AUC of each slide score tried


@dataclass(frozen=True)
class _Slide:
    pos: np.ndarray  # sorted logits of the compared IDC cells (none on an IDC-free slide)
    neg: np.ndarray  # sorted logits of the compared non-IDC cells (IDC-free: the computed cells)
    raw: np.ndarray  # the per-patch map, which an adaptive threshold reads
    idc_free: bool

    @property
    def idc_share(self) -> float:
        return len(self.pos) / max(1, len(self.pos) + len(self.neg))


def _slides(heatmaps: Sequence[Heatmap], labels: Sequence[np.ndarray | None], sigma: float) -> list[_Slide]:
    """Each slide's compared cells on the map with context ``sigma`` (as :func:`agreement` compares
    them: labelled cells outside the tissue count as probability 0); an IDC-free slide (labels
    None) compares its computed cells."""
    out = []
    for hm, lab in zip(heatmaps, labels, strict=True):
        raw = hm.raw_prob
        prob = context_prob(raw, sigma) if sigma > 0 else raw
        computed = np.isfinite(prob)
        if lab is None:
            z = np.sort(logit(prob[computed]))
            out.append(_Slide(np.empty(0), z, raw, True))
            continue
        use = (lab >= 0) & (computed | ~hm.tissue_cells)
        y, z = lab[use].astype(bool), logit(np.where(computed, prob, 0.0)[use])
        out.append(_Slide(np.sort(z[y]), np.sort(z[~y]), raw, False))
    return out


def _counts(sl: _Slide, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true, false) calls of a slide at logit thresholds ``t`` (called: z >= t)."""
    tp = len(sl.pos) - np.searchsorted(sl.pos, t, "left")
    fp = len(sl.neg) - np.searchsorted(sl.neg, t, "left")
    return tp, fp


def _grid(slides: Sequence[_Slide], shifts: np.ndarray, floor: float | None, slopes: np.ndarray,
          weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every slide's figures for every (slope, threshold): arrays (slides, slopes, thresholds).

    A slide's threshold is ``logit(t) + max(slope * shift, floor)`` (no floor: None)."""
    moves = slopes[None, :] * shifts[:, None]
    if floor is not None:
        moves = np.maximum(moves, floor)
    base = logit(THRESHOLDS)[None, :]
    shape = (len(slides), len(slopes), len(THRESHOLDS))
    f1, clear, bac, area = (np.full(shape, np.nan) for _ in range(4))
    for i, sl in enumerate(slides):
        t = base + moves[i][:, None]
        tp, fp = _counts(sl, t)
        if sl.idc_free:
            clear[i] = 1 - fp / max(1, len(sl.neg))
        elif len(sl.pos):
            f1[i] = 2 * tp / (tp + fp + len(sl.pos))
            area[i] = (tp + fp) / len(sl.pos)
            if len(sl.neg):
                bac[i] = 0.5 * (tp / len(sl.pos) + 1 - fp / len(sl.neg))
    score = np.where(np.isnan(f1), 0.0, f1) * weights[:, None, None, 0] \
        + np.where(np.isnan(clear), 0.0, clear) * weights[:, None, None, 1]
    return {"score": score, "f1": f1, "clear": clear, "bac": bac, "area": area}


def _best(score: np.ndarray) -> tuple[int, float, float]:
    """The best flat (slope, threshold) index by the summed objective on all slides, the objective
    there, and the objective left one slide out (each slide's share at the setting chosen on the
    others)."""
    flat = score.reshape(len(score), -1)
    total = flat.sum(axis=0)
    j = int(np.argmax(total))
    loo = sum(flat[i, int(np.argmax(total - flat[i]))] for i in range(len(flat)))
    return j, float(total[j]), float(loo)


def _weights(slides: Sequence[_Slide], idc_free_weight: float) -> np.ndarray:
    """(slides, 2): each slide's share of the F1 term and of the clear-tissue term."""
    has_idc = np.array([not s.idc_free and len(s.pos) > 0 for s in slides])
    f1 = has_idc & np.array([s.idc_share >= F1_MIN_IDC for s in slides])
    if not f1.any():  # only slides with little IDC: F1 over them all
        f1 = has_idc
    free = np.array([s.idc_free for s in slides])
    w_free = idc_free_weight if free.any() else 0.0
    out = np.zeros((len(slides), 2))
    out[f1, 0] = (1 - w_free) / f1.sum()
    if free.any():
        out[free, 1] = w_free / free.sum()
    return out


def _mean(a: np.ndarray) -> float | None:
    a = a[np.isfinite(a)]
    return round(float(a.mean()), 4) if a.size else None


def calibrate(heatmaps: Sequence[Heatmap], truths: Sequence[Truth], idc_free: Sequence[Heatmap] = (),
              sigmas: Sequence[float] = SIGMAS, idc_free_weight: float = IDC_FREE_WEIGHT) -> Calibration:
    """Choose the context neighbourhood, the (fixed or slide-adaptive) threshold and its floor, and
    the slide call, on validation slides with truth and on IDC-free validation slides."""
    labels: list[np.ndarray | None] = [cell_truth(hm.grid, t)[0] for hm, t in zip(heatmaps, truths, strict=True)]
    maps = [*heatmaps, *idc_free]
    labels += [None] * len(idc_free)
    keep = [i for i, lab in enumerate(labels) if lab is None or (lab == 1).any()]
    maps, labels = [maps[i] for i in keep], [labels[i] for i in keep]
    if not any(lab is not None for lab in labels):
        raise ValueError("No validation slide holds IDC cells; calibration needs some.")
    raws = [hm.raw_prob for hm in maps]
    adapts = {}
    for q in PERCENTILES:
        values = np.array([np.percentile(logit(r[np.isfinite(r)]), q) for r in raws])
        adapts[q] = ThresholdAdapt(q, 1.0, float(np.median(values)), float(values.min()), float(values.max()))
    shifts = {q: np.array([a.shift(r) for r in raws]) for q, a in adapts.items()}
    options: list[tuple[float | None, float | None]] = [(None, None)] + [(q, f) for q in PERCENTILES for f in FLOORS]
    table, grids = [], {}
    weights: np.ndarray | None = None
    for sigma in sigmas:
        slides = _slides(maps, labels, sigma)
        weights = _weights(slides, idc_free_weight) if weights is None else weights
        auc = _mean(np.array([M.roc_auc(np.r_[np.ones(len(s.pos)), np.zeros(len(s.neg))], np.r_[s.pos, s.neg])
                              for s in slides if len(s.pos) and len(s.neg) and not s.idc_free]))
        for q, floor in options:
            slopes = SLOPES[:1] if q is None else SLOPES
            g = _grid(slides, np.zeros(len(slides)) if q is None else shifts[q], floor, slopes, weights)
            grids[sigma, q, floor] = g
            j, total, loo = _best(g["score"])
            si, ti = np.unravel_index(j, g["score"].shape[1:])
            at = (slice(None), si, ti)
            pos = ~np.isnan(g["f1"][at]) & (weights[:, 0] > 0)
            table.append({
                "sigma": sigma, "percentile": q, "min_shift": floor, "slope": float(slopes[si]),
                "threshold": float(THRESHOLDS[ti]), "objective": round(total, 4), "loo_objective": round(loo, 4),
                "f1": _mean(g["f1"][at][pos]),
                "area_ratio": None if not pos.any() else round(float(np.median(g["area"][at][pos])), 3),
                "idc_free_called": None if not len(idc_free) else _mean(1 - g["clear"][at]),
                "idc_free_called_max": None if not len(idc_free) else round(float(np.nanmax(1 - g["clear"][at])), 4),
                "balanced_accuracy": _mean(g["bac"][at]), "auc": auc,
                "slides": int(sum(not s.idc_free for s in slides)), "idc_free_slides": len(idc_free)})
    best = max(table, key=lambda r: r["loo_objective"])  # first of equals: the simplest
    q, floor = best["percentile"], best["min_shift"]
    slope_i = int(np.searchsorted(SLOPES, best["slope"]))
    adapt = replace(adapts[q], slope=best["slope"], min_shift=floor) if q is not None and best["slope"] else None
    raw_grid = grids.get((0.0, q, floor))
    raw_t = float(THRESHOLDS[int(np.argmax(raw_grid["score"][:, slope_i].sum(axis=0)))]) if raw_grid is not None \
        else best["threshold"]
    policy, scores = _fit_slide_call(maps, labels, best["sigma"])
    return Calibration(best["sigma"], raw_t, best["threshold"], adapt, policy, table, scores)


def _fit_slide_call(maps: Sequence[Heatmap], labels: Sequence[np.ndarray | None],
                    sigma: float) -> tuple[SlideCallPolicy | None, dict[str, Any]]:
    """The slide score (top-k cells of the chosen map, k chosen by how well it ranks slides with IDC
    above IDC-free ones) and its call, or None without IDC-free slides."""
    probs = [context_prob(hm.raw_prob, sigma) if sigma > 0 else hm.raw_prob for hm in maps]
    is_pos = np.array([lab is not None for lab in labels])
    if is_pos.all():
        return None, {}
    aucs = {}
    for k in TOP_CELLS:
        s = np.array([raw_score(p, k) for p in probs], np.float64)
        aucs[k] = M.roc_auc(is_pos, s)
    k = max(TOP_CELLS, key=lambda c: (round(aucs[c], 4), -c))  # best, and of equals the fewest cells
    s = np.array([raw_score(p, k) for p in probs], np.float64)
    policy = fit_policy(s[is_pos], s[~is_pos], k)
    return policy, {"pair_auc_by_top_cells": {str(c): round(a, 4) for c, a in aucs.items()}, "top_cells": k}
