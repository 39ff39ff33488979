"""Is a slide within what the model was trained on? A warning, not a verdict.

Two checks, both cheap:

- resolution: the model reads every slide at its own resolution (4 um/px for the IDC model); a
  slide scanned coarser than that is upsampled, which the model never saw;
- appearance: each patch's colour statistics (mean optical density per RGB channel, mean
  haematoxylin / eosin / DAB concentration, spread of optical density) are kept with the
  heatmap; the slide's median is compared with the training patients' medians (Mahalanobis
  distance), and the limit is the 99th percentile of the training patients' own distances.
  Measured with the shipped model's training patients: the unseen demo breast patient scores
  2.2, the CMU skin slide 7.6, against a limit of 5.91. (Distances of the network's pooled
  features were tried first: they separated the skin slide for the PNG-trained model, but not
  for the JPEG-robust one, whose features are deliberately insensitive to such changes.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from inference.tasks import task_of

if TYPE_CHECKING:  # only its type: the annotation layer, which reads heatmaps, must not load torch
    from inference.model import ModelMeta

#: RGB optical density of pure haematoxylin, eosin and DAB (Ruifrok & Johnston 2001, as in skimage).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
#: Colour statistics per patch (see :func:`patch_stats`).
N_STATS = 9
#: A slide coarser than this many times the model's resolution is flagged.
MAX_MPP_RATIO = 1.5
#: Percentile of the training patients' distances used as the limit.
LIMIT_PERCENTILE = 99.0


def patch_stats(images: np.ndarray) -> np.ndarray:
    """(n, 9) float32 colour statistics of uint8 patches (n, h, w, 3): mean OD (R, G, B), mean
    H, E, D concentration, and the standard deviation of OD per channel."""
    x = images.reshape(len(images), -1, 3).astype(np.float32) / 255
    od = -np.log(np.clip(x, 1 / 255, 1))
    hed = od @ HED_FROM_RGB.astype(np.float32)
    return np.concatenate([od.mean(1), hed.mean(1), od.std(1)], axis=1).astype(np.float32)


def fit_domain(stats: np.ndarray, groups: np.ndarray, ridge: float = 0.0) -> dict[str, Any]:
    """Domain statistics of training patches' colour statistics (n, 9) and their patients.

    ``ridge`` adds that share of each statistic's variance to the covariance's diagonal: colour
    groups (:func:`colour_groups`) spread along the colours they were clustered on and hardly
    across them, and without it a slide of the same data set's patches scored 21 against a limit
    of 6.4 (with 0.01: 3.1 against 5.3)."""
    medians = np.stack([np.median(stats[groups == g], axis=0) for g in np.unique(groups)])
    mean = medians.mean(axis=0)
    cov = np.cov(medians.T)
    inv_cov = np.linalg.inv(cov + ridge * np.diag(np.diag(cov)) + 1e-9 * np.eye(medians.shape[1]))
    domain: dict[str, Any] = {"statistic": "colour-od-hed-v1", "mean": mean.tolist(),
                              "inv_cov": inv_cov.tolist(), "patients": len(medians)}
    dists = [distance(m, domain) for m in medians]
    domain["score_limit"] = round(float(np.percentile(dists, LIMIT_PERCENTILE)), 4)
    return domain


def colour_groups(stats: np.ndarray, k: int = 64, seed: int = 0, iterations: int = 25) -> np.ndarray:
    """Group patches of a data set without slide ids (PatchCamelyon) by colour, as stand-ins for the
    slides they came from: k-means over standardised statistics, a patch's group is its cluster.
    Slides differ mostly by stain and scanner, so a cluster gathers patches that look alike as a
    slide's do, and the clusters' medians spread as slides' medians would."""
    z = (stats - stats.mean(0)) / (stats.std(0) + 1e-9)
    rng = np.random.default_rng(seed)
    centres = z[rng.choice(len(z), size=min(k, len(z)), replace=False)]
    for _ in range(iterations):
        labels = np.argmin(((z[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        centres = np.stack([z[labels == c].mean(0) if (labels == c).any() else centres[c] for c in range(len(centres))])
    return np.argmin(((z[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)


def distance(slide_median: np.ndarray, domain: dict[str, Any]) -> float:
    """Mahalanobis distance of a slide's median colour statistics from the training patients'."""
    d = np.asarray(slide_median, np.float64) - np.asarray(domain["mean"], np.float64)
    return float(np.sqrt(max(0.0, d @ np.asarray(domain["inv_cov"], np.float64) @ d)))


def slide_score(stats: np.ndarray, domain: dict[str, Any]) -> float | None:
    """Distance of a slide whose computed patches have colour statistics ``stats`` (n, 9)."""
    if domain.get("statistic") != "colour-od-hed-v1" or not len(stats):
        return None
    return distance(np.median(stats, axis=0), domain)


def warnings(slide_mpp: float | None, meta: ModelMeta, score: float | None) -> list[str]:
    """One sentence per reason the slide may lie outside the model's training domain."""
    tissue = task_of(meta.task).tissue
    out = []
    if slide_mpp is not None and slide_mpp > meta.mpp * MAX_MPP_RATIO:
        out.append(f"The slide is scanned at {slide_mpp:.2f} \u00b5m/px, coarser than the model's "
                   f"{meta.mpp:g} \u00b5m/px: it is upsampled, which the model was not trained on.")
    limit = meta.domain.get("score_limit")
    if score is not None and limit is not None and score > limit:
        out.append(f"The tissue looks unlike the {tissue} the model was trained on (colour score "
                   f"{score:.1f} above {limit:.1f}): another organ, stain or scanner; read the heatmap with care.")
    return out
