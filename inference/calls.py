"""The slide-level answer: a calibrated slide score and a call, from the heatmap.

A pathologist reads a slide first as a whole: is there IDC on it? The slide score is the mean
probability of the slide's most confident cells (the top ``top_cells`` of the map the model was
calibrated on), mapped through a logistic fit (Platt scaling) to the probability that the slide
holds IDC, fitted on validation slides with IDC and on IDC-free ones. Two limits chosen on the
same slides turn it into a call:

- at or above ``high``: "<positive class> found" (few IDC-free validation slides reach it);
- below ``low``: "no <positive class> found" (nearly every validation slide with IDC is above it);
  on such a slide no cell is called, so the map, its regions and the cohort's area agree with
  the call;
- between them, or on a slide outside the model's domain: "uncertain".

Everything here is numpy on a finished (or filling) probability map; nothing reads pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference.context import logit, sigmoid

FOUND, NOT_FOUND, UNCERTAIN = "found", "not found", "uncertain"


@dataclass(frozen=True)
class SlideCallPolicy:
    """How a map becomes a slide score and a call (stored in the checkpoint as a dict)."""

    top_cells: int  # the slide's raw score: mean probability of its this many most confident cells
    slope: float  # Platt scaling: score = sigmoid(slope * logit(raw) + intercept)
    intercept: float
    low: float  # calibrated score below which nothing is called
    high: float  # calibrated score at or above which the positive class is found

    def __post_init__(self) -> None:
        if self.top_cells < 1 or not 0 <= self.low <= self.high <= 1:
            raise ValueError("A slide call needs top_cells >= 1 and 0 <= low <= high <= 1.")

    def raw_score(self, prob: np.ndarray) -> float | None:
        """Mean of the ``top_cells`` highest probabilities of a map (fewer on a small slide)."""
        return raw_score(prob, self.top_cells)

    def score(self, prob: np.ndarray) -> float | None:
        """The calibrated slide score of a (rows, cols) probability map, NaN where not computed."""
        raw = self.raw_score(prob)
        return None if raw is None else float(sigmoid(self.slope * logit(raw) + self.intercept))

    def call(self, score: float | None, out_of_domain: bool = False) -> str:
        """FOUND, NOT_FOUND or UNCERTAIN for a calibrated score (UNCERTAIN without one)."""
        if score is None or out_of_domain:
            return UNCERTAIN
        if score >= self.high:
            return FOUND
        return NOT_FOUND if score < self.low else UNCERTAIN


def raw_score(prob: np.ndarray, top_cells: int) -> float | None:
    """Mean of the ``top_cells`` highest finite values of ``prob``; None if none is finite."""
    p = prob[np.isfinite(prob)]
    if not p.size:
        return None
    k = min(top_cells, p.size)
    return float(np.partition(p, p.size - k)[p.size - k :].mean())


def call_text(call: str, positive: str) -> str:
    """The call in words, with the model's positive class name ("IDC found", "no IDC found")."""
    return {FOUND: f"{positive} found", NOT_FOUND: f"no {positive} found"}.get(call, "uncertain")


def fit_platt(raw: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 100) -> tuple[float, float]:
    """(slope, intercept) of P(y) = sigmoid(slope * logit(raw) + intercept), by Newton's method
    with a small L2 penalty on the slope (slides that separate perfectly still give finite values)."""
    x = logit(np.asarray(raw, np.float64))
    y = np.asarray(y, np.float64)
    w = np.zeros(2)
    X = np.stack([x, np.ones_like(x)], axis=1)
    reg = np.diag([l2, 1e-9])
    for _ in range(steps):
        p = sigmoid(X @ w)
        grad = X.T @ (p - y) + reg @ w
        hess = (X * (p * (1 - p))[:, None]).T @ X + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def fit_policy(pos_raw: np.ndarray, neg_raw: np.ndarray, top_cells: int,
               sensitivity: float = 0.95, specificity: float = 0.95) -> SlideCallPolicy:
    """A policy from the raw scores of validation slides with IDC (``pos_raw``) and IDC-free ones.

    ``low`` keeps at least ``sensitivity`` of the slides with IDC at or above it; ``high`` keeps at
    least ``specificity`` of the IDC-free slides below it. Where the two classes separate that well,
    the limits meet half-way and no slide of validation is uncertain.
    """
    pos_raw, neg_raw = np.asarray(pos_raw, np.float64), np.asarray(neg_raw, np.float64)
    if not len(pos_raw) or not len(neg_raw):
        raise ValueError("A slide call is fitted on slides with IDC and IDC-free slides; one kind is missing.")
    slope, intercept = fit_platt(np.concatenate([pos_raw, neg_raw]),
                                 np.r_[np.ones(len(pos_raw)), np.zeros(len(neg_raw))])
    pos = np.sort(sigmoid(slope * logit(pos_raw) + intercept))
    neg = np.sort(sigmoid(slope * logit(neg_raw) + intercept))
    # low: the largest value with at most (1 - sensitivity) of the positives below it
    low = float(pos[int(np.floor((1 - sensitivity) * len(pos)))])
    # high: just above the IDC-free slide at the specificity quantile
    i = min(len(neg) - 1, int(np.ceil(specificity * len(neg))) - 1)
    high = float(np.nextafter(neg[i], np.inf))
    if high < low:
        low = high = 0.5 * (low + high)
    return SlideCallPolicy(top_cells, slope, intercept, min(1.0, low), min(1.0, high))


def call_of_text(text: str) -> str:
    """FOUND, NOT_FOUND or UNCERTAIN from the words of :func:`call_text` (as cohort.csv holds them)."""
    words = text.strip().lower()
    if words.startswith("no ") and words.endswith(" found"):
        return NOT_FOUND
    return FOUND if words.endswith(" found") else UNCERTAIN
