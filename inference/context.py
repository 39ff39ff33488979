"""Tissue context on the heatmap grid: each cell's probability informed by its neighbours.

A 200 um patch sees little of the architecture a pathologist reads: IDC is a sheet of tumour
cells, not one isolated patch among fat. The context map is a Gaussian average of the patch
logits over neighbouring computed cells (normalised convolution: cells outside the tissue are
left out, not counted as zero), mapped back through the sigmoid. It changes values only: the
cell grid, its alignment and which cells are computed stay exactly as in the per-patch map.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-6


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
    p = np.clip(np.where(valid, prob, 0.5).astype(np.float64), _EPS, 1 - _EPS)
    logit = np.log(p / (1 - p)) * valid
    k = gaussian_kernel(sigma)
    num = _blur(logit, k)
    den = _blur(valid.astype(np.float64), k)
    with np.errstate(invalid="ignore", divide="ignore"):
        smoothed = 1 / (1 + np.exp(-num / np.maximum(den, _EPS)))
    return np.where(valid, smoothed, np.nan).astype(np.float32)
