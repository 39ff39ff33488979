"""Tissue context on the heatmap grid: each cell's probability informed by its neighbours.

A 200 um patch sees little of the architecture a pathologist reads: IDC is a sheet of tumour
cells, not one isolated patch among fat. The context map is a Gaussian average of the patch
logits over neighbouring computed cells (normalised convolution: cells outside the tissue are
left out, not counted as zero), mapped back through the sigmoid. It changes values only: the
cell grid, its alignment and which cells are computed stay exactly as in the per-patch map.

The decision threshold may follow the slide too (:class:`ThresholdAdapt`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-6


def logit(p: np.ndarray | float) -> np.ndarray:
    """log(p / (1 - p)), with p kept off 0 and 1."""
    q = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(q / (1 - q))


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def context_radius(sigma: float) -> int:
    """How many cells away a cell's context reaches (3 sigma, at least 1; 0 without context)."""
    return max(1, int(np.ceil(3 * sigma))) if sigma > 0 else 0


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps out to :func:`context_radius`."""
    radius = context_radius(sigma)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'same' convolution of a 2-D array with zero padding."""
    r = len(k) // 2
    p = np.pad(a, r)
    rows = sum(k[i] * p[:, i : i + a.shape[1]] for i in range(len(k)))
    return sum(k[i] * rows[i : i + a.shape[0], :] for i in range(len(k)))


def context_prob(prob: np.ndarray, sigma: float) -> np.ndarray:
    """Context-aware probabilities of a (rows, cols) cell map; NaN (not computed) stays NaN.

    ``sigma`` is in cells; 0 returns the map unchanged.
    """
    if sigma <= 0 or prob.size == 0:
        return prob
    valid = np.isfinite(prob)
    if not valid.any():
        return prob
    z = logit(np.where(valid, prob, 0.5)) * valid
    k = gaussian_kernel(sigma)
    num = _blur(z, k)
    den = _blur(valid.astype(np.float64), k)
    with np.errstate(invalid="ignore", divide="ignore"):
        smoothed = sigmoid(num / np.maximum(den, _EPS))
    return np.where(valid, smoothed, np.nan).astype(np.float32)


@dataclass(frozen=True)
class ThresholdAdapt:
    """A decision threshold that follows the slide's own scores, chosen on validation slides.

    Scanners, stains and compression shift a whole slide's scores up or down together: on such a
    slide the ranking of its cells holds (high AUC) while one fixed threshold paints IDC over
    stroma. A percentile of the slide's per-patch logits measures the shift; the threshold moves
    with it in logit space, ``logit(t) = logit(t_model) + slope * (P - reference)``. P is clamped
    to the range seen in calibration, so an odd slide is never extrapolated to.

    A slide whose scores sit low is most often a slide without IDC, where a falling threshold
    paints benign tissue: ``min_shift`` is the floor of the move (0: never below the model's own
    threshold, which calibration chose with IDC-free slides in view; None: no floor).
    """

    percentile: float  # of the per-patch logits of the computed cells, 0-100
    slope: float
    reference: float  # the value of P at which the threshold is the model's own
    low: float
    high: float
    min_shift: float | None = None  # the threshold never moves further down than this (logit)

    def shift(self, raw_prob: np.ndarray) -> float:
        """How far (in logit) the threshold of a slide with this per-patch map moves; 0 if empty."""
        p = raw_prob[np.isfinite(raw_prob)]
        if p.size == 0:
            return 0.0
        value = float(np.clip(np.percentile(logit(p), self.percentile), self.low, self.high))
        move = self.slope * (value - self.reference)
        return move if self.min_shift is None else max(move, self.min_shift)

    @staticmethod
    def threshold_shifted(base: float, shift: float) -> float:
        """The model threshold ``base`` moved by ``shift`` (from :meth:`shift`) in logit space."""
        return float(sigmoid(logit(base) + shift))
