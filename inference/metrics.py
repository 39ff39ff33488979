"""Binary classification metrics with optional sample weights (e.g. 1 / patches per patient)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Metrics:
    """Metrics of IDC (positive) vs non-IDC at one decision threshold."""

    n: int
    accuracy: float
    balanced_accuracy: float
    f1: float
    auc: float
    sensitivity: float
    specificity: float
    threshold: float
    tn: float
    fp: float
    fn: float
    tp: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def roc_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """Weighted ROC AUC (ties count half); NaN when only one class is present."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    w = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
    w_pos, w_neg = w[y].sum(), w[~y].sum()
    if w_pos == 0 or w_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    p_s, y_s, w_s = p[order], y[order], w[order]
    # Group tied scores: negatives strictly below + half of the tied negatives.
    uniq, start = np.unique(p_s, return_index=True)
    neg_w = np.where(~y_s, w_s, 0.0)
    pos_w = np.where(y_s, w_s, 0.0)
    neg_group = np.add.reduceat(neg_w, start)
    pos_group = np.add.reduceat(pos_w, start)
    neg_below = np.cumsum(neg_group) - neg_group
    return float(np.sum(pos_group * (neg_below + 0.5 * neg_group)) / (w_pos * w_neg))


def compute(y: np.ndarray, p: np.ndarray, threshold: float = 0.5, w: np.ndarray | None = None) -> Metrics:
    """All metrics at ``threshold``; ``w`` weights samples (None = every patch counts once)."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    w = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
    pred = p >= threshold
    tp = float(w[y & pred].sum())
    fn = float(w[y & ~pred].sum())
    tn = float(w[~y & ~pred].sum())
    fp = float(w[~y & pred].sum())
    total = tp + fn + tn + fp
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return Metrics(
        n=int(len(y)),
        accuracy=(tp + tn) / total if total else float("nan"),
        balanced_accuracy=float(np.nanmean([sens, spec])),
        f1=f1,
        auc=roc_auc(y, p, w),
        sensitivity=sens,
        specificity=spec,
        threshold=float(threshold),
        tn=tn,
        fp=fp,
        fn=fn,
        tp=tp,
    )


def best_threshold(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """The threshold maximising balanced accuracy (searched on a 0.01 grid)."""
    grid = np.round(np.linspace(0.02, 0.98, 97), 2)  # 0.48, not 0.48000000000000004
    scores = [compute(y, p, float(t), w).balanced_accuracy for t in grid]
    return float(grid[int(np.nanargmax(scores))])
