"""A folder of slides as a worklist: each slide's facts, heatmap status and cohort figures.

Figures come from a ``cohort.csv`` written by `idc-viewer predict` (in the folder or one level
below) or from the heatmap cache of the model in use; both generators run on a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from inference.calls import FOUND, NOT_FOUND, UNCERTAIN, call_of_text
from inference.cohort import SUMMARY_CSV, SlideOutcome, figures, find_slides, read_summary
from inference.errors import UserError
from inference.model import LoadedModel, pick_device
from inference.predict import PredictSettings
from inference.session import cached_heatmap, infer
from inference.slide import open_slide

log = logging.getLogger(__name__)

THUMB_PX = 72
#: The cohort figures a worklist row shows (names shared with inference.cohort's summary).
FIGURES = ("slide_call", "slide_score", "out_of_domain", "domain_score", "idc_fraction", "idc_area_um2",
           "largest_idc_region_um2", "max_probability")
DEFAULT_SETTINGS = PredictSettings()


@dataclass(frozen=True)
class WorklistRow:
    """One slide of the worklist (figures None where unknown)."""

    path: Path
    dimensions: tuple[int, int] | None = None
    mpp: float | None = None
    #: computed | computed (another model) | partly computed | not computed | failed | unreadable
    status: str = "not computed"
    reason: str = ""
    slide_call: str = ""  # "IDC found", "no IDC found", "uncertain" (inference.calls)
    slide_score: float | None = None
    out_of_domain: bool | None = None
    domain_score: float | None = None
    idc_fraction: float | None = None
    idc_area_um2: float | None = None
    largest_idc_region_um2: float | None = None
    max_probability: float | None = None
    thumbnail: np.ndarray | None = field(default=None, compare=False, repr=False)


def cohort_rows(folder: Path) -> dict[str, SlideOutcome]:
    """cohort.csv rows found in the folder or its direct subfolders, by slide file name."""
    out: dict[str, SlideOutcome] = {}
    for csv_path in [folder / SUMMARY_CSV, *sorted(folder.glob(f"*/{SUMMARY_CSV}"))]:
        out.update(read_summary(csv_path))
    return out


def list_folder(folder: str | Path) -> list[WorklistRow]:
    """The folder's slides (searched below it for every format the viewer opens), names only."""
    return [WorklistRow(p) for p in find_slides([folder])]


def scan(folder: str | Path, rows: Sequence[WorklistRow], model: LoadedModel | None,
         settings: PredictSettings = DEFAULT_SETTINGS) -> Iterator[tuple[int, WorklistRow]]:
    """Each listed row filled in (facts, thumbnail, figures), in order."""
    cohort = cohort_rows(Path(folder))
    for i, r in enumerate(rows):
        yield i, describe(r.path, model, settings, cohort.get(r.path.name))


def describe(path: Path, model: LoadedModel | None, settings: PredictSettings = DEFAULT_SETTINGS,
             summary: SlideOutcome | None = None) -> WorklistRow:
    """A slide's row: facts, thumbnail, and its figures from the cache, else from the summary."""
    try:
        with open_slide(path) as slide:
            row = WorklistRow(path, slide.dimensions, slide.mpp, thumbnail=slide.thumbnail(THUMB_PX))
            hm = cached_heatmap(slide, model, settings) if model is not None and slide.mpp else None
            if hm is not None and hm.complete:
                f = figures(hm, slide.mpp, model.meta)
                return replace(row, status="computed", **{k: f[k] for k in FIGURES})
            if summary is not None and summary.status in ("done", "skipped", "failed"):
                status = "failed" if summary.status == "failed" else "computed"
                if model is not None and summary.model_id and summary.model_id != model.model_id:
                    status += " (another model)"  # a cohort run with a model other than the one in use
                return replace(row, status=status, reason=summary.reason,
                               **{k: getattr(summary, k) for k in FIGURES})
            if hm is not None:
                return replace(row, status="partly computed")
            if slide.mpp is None:
                return replace(row, reason="no resolution (MPP)")
            return row
    except UserError as exc:
        return WorklistRow(path, status="unreadable", reason=str(exc))


def priority(row: WorklistRow) -> tuple[int, float, float]:
    """The worklist's default order, most urgent first (sort ascending by this key).

    Slides the model calls positive come first, then uncertain ones, then those it clears, each
    by slide score, highest first (then IDC fraction, for a model without a slide call); slides
    outside the model's domain follow, unranked by a burden the model cannot vouch for; slides
    without figures come last.
    """
    if row.out_of_domain:
        return (3, 0.0, 0.0)
    if not row.slide_call and row.slide_score is None and row.idc_fraction is None:
        return (4, 0.0, 0.0)
    call = call_of_text(row.slide_call)
    rank = {FOUND: 0, UNCERTAIN: 1, NOT_FOUND: 2}[call] if row.slide_call else 1
    return (rank, -(row.slide_score or 0.0), -(row.idc_fraction or 0.0))


def needs_heatmap(row: WorklistRow) -> bool:
    """Whether *Compute missing heatmaps* would compute this slide (with the model in use)."""
    return row.status in ("not computed", "partly computed", "computed (another model)") and row.mpp is not None


def compute_missing(rows: Sequence[WorklistRow], model: LoadedModel, device: str = "auto",
                    settings: PredictSettings = DEFAULT_SETTINGS) -> Iterator[tuple[int, WorklistRow]]:
    """Compute the heatmaps the worklist lacks, one slide after another (the local engine);
    yields each slide's new row. Stopping keeps the finished slides (and the current one's
    finished cells, in the cache)."""
    todo = [i for i, r in enumerate(rows) if needs_heatmap(r)]
    for i in todo:
        with open_slide(rows[i].path) as slide:
            for _report in infer(slide, model, pick_device(device), settings):
                pass
        yield i, describe(rows[i].path, model, settings)
