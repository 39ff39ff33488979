"""Is a slide within what the model was trained on? A warning, not a verdict.

Two checks, both cheap:

- resolution: the model reads every slide at its own resolution (4 um/px for the IDC model); a
  slide scanned coarser than that is upsampled, which the model never saw;
- appearance: each patch's pooled network features are compared with the training patches'
  (a diagonal Mahalanobis distance, Lee et al. 2018); the slide's score is the median over its
  tissue patches, and the limit is the 99th percentile of the training patients' own scores.
  A slide of another organ or stain scores above it (the CMU skin slide: 1.42 against a limit of
  1.12 with the first IDC model; the unseen demo breast patient: 0.99).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from inference.model import LoadedModel, ModelMeta

#: A slide coarser than this many times the model's resolution is flagged.
MAX_MPP_RATIO = 1.5
#: Percentile of the training patients' scores used as the limit.
LIMIT_PERCENTILE = 99.0


def feature_scores(features: torch.Tensor | np.ndarray, domain: dict[str, Any]) -> np.ndarray | None:
    """Per-patch distance of pooled features (n, c) from the training domain; None if unknown."""
    if not domain:
        return None
    f = features.detach().float().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    mean = np.asarray(domain["feature_mean"], np.float32)
    sd = np.asarray(domain["feature_sd"], np.float32)
    return np.sqrt((((f - mean) / sd) ** 2).mean(axis=1)).astype(np.float32)


def fit_domain(features: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """Domain statistics of training features (n, c) and their patients: mean, spread, limit."""
    mean = features.mean(axis=0)
    sd = features.std(axis=0) + 1e-6
    domain: dict[str, Any] = {"feature_mean": mean.round(6).tolist(), "feature_sd": sd.round(6).tolist()}
    scores = feature_scores(features, domain)
    assert scores is not None
    per_patient = [float(np.median(scores[groups == g])) for g in np.unique(groups)]
    domain["score_limit"] = round(float(np.percentile(per_patient, LIMIT_PERCENTILE)), 4)
    domain["patients"] = len(per_patient)
    return domain


def warnings(slide_mpp: float | None, meta: ModelMeta, score: float | None) -> list[str]:
    """One sentence per reason the slide may lie outside the model's training domain."""
    out = []
    if slide_mpp is not None and slide_mpp > meta.mpp * MAX_MPP_RATIO:
        out.append(f"The slide is scanned at {slide_mpp:.2f} \u00b5m/px, coarser than the model's "
                   f"{meta.mpp:g} \u00b5m/px: it is upsampled, which the model was not trained on.")
    limit = meta.domain.get("score_limit")
    if score is not None and limit is not None and score > limit:
        out.append(f"The tissue looks unlike the breast H&E the model was trained on (domain score "
                   f"{score:.2f} above {limit:.2f}): another organ, stain or scanner; read the heatmap with care.")
    return out


def model_features(model: LoadedModel, images: Sequence[np.ndarray] | np.ndarray, device: torch.device | str = "cpu",
                   batch: int = 256) -> np.ndarray:
    """Pooled features (n, c) of uint8 patches (n, h, w, 3), for :func:`fit_domain`."""
    from inference.model import normalise, to_float

    net = model.net.to(device).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = normalise(to_float(np.asarray(images[i : i + batch]), device), model.meta)
            out.append(net.features(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
