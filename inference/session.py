"""One inference session: plan, cache, predict and save a slide's heatmap, as a generator.

`idc-viewer predict` and the GUI's heatmap panel both drive :func:`infer`, so the two share
every step (plan -> cached cells -> predict the rest -> save) and their results are the same.
The session owns the one heatmap of the job: batches land in it on the worker thread and the
consumer only reads it (see :class:`inference.heatmap.Heatmap`). A stopped session saves the
cells it finished, so the next session on the same slide and model resumes where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.heatmap import Heatmap, cache_path, load_cached
from inference.model import LoadedModel
from inference.predict import BatchResult, PredictSettings, heatmap_info, plan, predict_slide
from inference.slide import Slide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Planned:
    """First report: the heatmap this session fills (tissue known, cached cells already in)."""

    heatmap: Heatmap
    resumed: int  # tissue patches already computed (from the cache or an earlier session)

    @property
    def total(self) -> int:
        return int(self.heatmap.tissue.sum())


@dataclass(frozen=True)
class Finished:
    """Last report: every tissue patch is computed and the heatmap is in the cache."""

    heatmap: Heatmap
    cache: Path | None


Report = Planned | BatchResult | Finished


def cached_heatmap(slide: Slide, model: LoadedModel, settings: PredictSettings) -> Heatmap | None:
    """The cached heatmap of this slide and model (finished or not), or None; reads no pixels."""
    return load_cached(heatmap_info(slide, model, settings))


def infer(slide: Slide, model: LoadedModel, device: torch.device | str = "cpu",
          settings: PredictSettings | None = None, *, read_cache: bool = True,
          resume: Heatmap | None = None) -> Iterator[Report]:
    """Planned, then a BatchResult per batch, then Finished.

    ``resume`` continues a heatmap of the same slide and model (the one on screen); otherwise
    the cache is read unless ``read_cache`` is False. The cache is written at the end, and also
    when the consumer stops early, so finished cells are never computed twice.
    """
    settings = settings or PredictSettings()
    info = heatmap_info(slide, model, settings)
    heatmap = resume if resume is not None and resume.info.key() == info.key() else None
    if heatmap is None and read_cache:
        heatmap = load_cached(info)
    if heatmap is None:
        heatmap = plan(slide, model, settings)
    resumed = int((heatmap.patch_done & heatmap.tissue).sum())
    yield Planned(heatmap, resumed)
    saved = False
    try:
        if not heatmap.complete:
            yield from predict_slide(slide, model, heatmap, device, settings)
        path = _save(heatmap)
        saved = True
        yield Finished(heatmap, path)
    finally:
        if not saved and int((heatmap.patch_done & heatmap.tissue).sum()) > resumed:
            _save(heatmap)  # stopped part-way: keep what was computed for the next session


def _save(heatmap: Heatmap) -> Path | None:
    try:
        return heatmap.save(cache_path(heatmap.info))
    except OSError:
        log.warning("could not cache the heatmap", exc_info=True)
        return None
