"""Cohorts: heatmaps of many slides, one task per slide, and the cohort summary.

:func:`run_slide` is the one piece of work per slide, run as it is by the local engine and, as a
Ray task, by ``inference.cohort_ray`` (Ray is an optional extra this module never imports). A
slide whose outputs exist for this model and settings is skipped; a slide that fails is recorded
with its one-line reason and the others go on. ``cohort.csv`` and ``cohort.json`` are rewritten
(atomically) after every slide, so an interrupted run leaves every finished slide complete.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inference.annotation_io import dumps_geojson
from inference.annotations import AnnotationStore, regions_from_heatmap
from inference.atomic import atomic_path, write_bytes
from inference.calls import call_text
from inference.domain import warnings as domain_warnings
from inference.errors import UserError
from inference.heatmap import DEFAULT_COLORMAP, Heatmap, load_matching
from inference.model import LoadedModel, ModelMeta, load_checkpoint, pick_device
from inference.predict import PredictSettings, heatmap_info
from inference.session import Finished, infer
from inference.slide import SLIDE_SUFFIXES, open_slide

log = logging.getLogger(__name__)

SUMMARY_CSV, SUMMARY_JSON = "cohort.csv", "cohort.json"


class CohortError(UserError):
    """The cohort cannot run (no slides, no Ray...); one sentence."""


def find_slides(paths: Iterable[str | Path]) -> list[Path]:
    """Slide files given, and every slide of the viewer's formats under the folders given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES
                          and not f.name.endswith(".heatmap.png"))
        else:
            out.append(p)
    unique: dict[Path, Path] = {}  # a slide named twice (or via a link) is computed once
    for p in out:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def output_stems(slides: Sequence[Path]) -> list[str]:
    """One output name per slide: its stem, made unique with _2, _3... in input order."""
    used: dict[str, int] = {}
    out = []
    for s in slides:
        n = used.get(s.stem, 0) + 1
        used[s.stem] = n
        out.append(s.stem if n == 1 else f"{s.stem}_{n}")
    return out


@dataclass(frozen=True)
class SlideTask:
    """Everything one slide's work needs; small and picklable (it travels to Ray workers)."""

    slide: str
    out_dir: str
    stem: str
    model_path: str
    settings: PredictSettings = PredictSettings()
    mpp: float | None = None
    device: str = "auto"
    min_area_um2: float = 0.0
    threads: int | None = None  # torch CPU threads in this process (None: leave as is)
    trust_torchscript: bool = False  # a WSInfer model folder may load (its TorchScript is code)


@dataclass(frozen=True)
class SlideOutcome:
    """One row of the cohort summary."""

    slide: str
    status: str  # done | skipped | failed
    reason: str = ""
    tissue_area_um2: float | None = None
    idc_area_um2: float | None = None
    idc_fraction: float | None = None
    largest_idc_region_um2: float | None = None
    max_probability: float | None = None
    mean_probability: float | None = None
    threshold: float | None = None  # the model's threshold on this slide (it may adapt to the slide)
    slide_score: float | None = None  # calibrated slide score (inference.calls)
    slide_call: str = ""  # "IDC found", "no IDC found" or "uncertain" (the model's class name)
    positive_class: str = ""  # what the idc_* columns count: the model's class ("IDC", "Metastasis")
    domain_score: float | None = None  # colour distance from the training domain (inference.domain)
    out_of_domain: bool | None = None  # the slide lies outside what the model was trained on
    model_id: str = ""
    seconds: float = 0.0
    engine: str = "local"


COLUMNS = tuple(f.name for f in fields(SlideOutcome))


def figures(heatmap: Heatmap, mpp: float, meta: ModelMeta) -> dict[str, Any]:
    """Cohort figures of a finished heatmap, on the map shown by default (context when defined),
    from the model's calls (:attr:`Heatmap.called`), with the slide's answer (score, call) and
    whether it lies outside the model's domain (then the call is "uncertain")."""
    domain_score = heatmap.domain_score(meta.domain)
    out_of_domain = bool(domain_warnings(mpp, meta, domain_score))
    call = heatmap.slide_call(out_of_domain)
    score = heatmap.slide_score
    cell_um2 = (heatmap.grid.stride_l0 * mpp) ** 2
    prob = heatmap.prob
    computed = np.isfinite(prob)
    tissue = float(computed.sum()) * cell_um2
    idc = float(heatmap.called.sum()) * cell_um2
    regions = regions_from_heatmap(heatmap, None, 0.0, mpp)
    return {
        "tissue_area_um2": round(tissue, 1),
        "idc_area_um2": round(idc, 1),
        "idc_fraction": round(idc / tissue, 6) if tissue else None,
        "largest_idc_region_um2": round(max((r.area_um2(mpp) or 0.0 for r in regions), default=0.0), 1),
        "max_probability": round(float(np.nanmax(prob)), 6) if computed.any() else None,
        "mean_probability": round(float(np.nanmean(prob)), 6) if computed.any() else None,
        "threshold": round(heatmap.threshold, 4),
        "slide_score": None if score is None else round(score, 4),
        "slide_call": "" if call is None else call_text(call, meta.positive_class),
        "positive_class": meta.positive_class,
        "domain_score": None if domain_score is None else round(domain_score, 3),
        "out_of_domain": out_of_domain,
    }


def write_outputs(heatmap: Heatmap, out_dir: Path, stem: str, colormap: str = DEFAULT_COLORMAP,
                  mpp: float | None = None, min_area_um2: float = 0.0) -> list[Path]:
    """Write <stem>.heatmap.npz/.heatmap.png/.patches.csv and the regions the model calls,
    <stem>.<class>.geojson in the model's positive class (``idc``, ``metastasis``)."""
    label = heatmap.info.positive.lower()
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = heatmap.save(out_dir / f"{stem}.heatmap.npz")
    png = out_dir / f"{stem}.heatmap.png"
    with atomic_path(png) as tmp:
        Image.fromarray(heatmap.to_rgba(colormap)).save(tmp)
    csv_path = out_dir / f"{stem}.patches.csv"
    rows, cols = np.nonzero(heatmap.patch_done)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["row", "col", "x_l0", "y_l0", "w_l0", "h_l0", f"prob_{label}"])
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            rect = heatmap.grid.patch_rect(r, c)
            w.writerow([r, c, rect.x, rect.y, rect.w, rect.h, f"{heatmap.patch_prob[r, c]:.6f}"])
    # Ids from the heatmap and each region's rank: the same heatmap always writes the same file.
    regions = [replace(r, id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"idc-heatmap:{heatmap.info.key()}:{r.name}")))
               for r in regions_from_heatmap(heatmap, None, min_area_um2, mpp)]
    geojson = out_dir / f"{stem}.{label}.geojson"
    write_bytes(geojson, dumps_geojson(regions, AnnotationStore()))
    return [npz, png, csv_path, geojson]


def run_slide(task: SlideTask, model: LoadedModel | None = None, engine: str = "local",
              on_report: Callable[[object], None] | None = None) -> SlideOutcome:
    """Heatmap outputs of one slide (the same files as `idc-viewer predict`), or why not.

    Never raises for a bad slide: the reason is in the outcome.
    """
    t0 = time.perf_counter()
    name = Path(task.slide).name
    try:
        if task.threads:
            import torch

            torch.set_num_threads(task.threads)
        model = model or load_checkpoint(task.model_path, pick_device(task.device), task.trust_torchscript)
        with open_slide(task.slide, mpp=task.mpp) as slide:
            if slide.mpp is None:
                return SlideOutcome(name, "failed", "the slide has no resolution (MPP); pass --mpp UM",
                                    model_id=model.model_id, engine=engine)
            out_dir = Path(task.out_dir)
            existing = load_matching(out_dir / f"{task.stem}.heatmap.npz", heatmap_info(slide, model, task.settings))
            if existing is not None and existing.complete:
                return SlideOutcome(name, "skipped", "results exist for this model and settings",
                                    **figures(existing, slide.mpp, model.meta), model_id=model.model_id, engine=engine)
            heatmap = None
            for report in infer(slide, model, pick_device(task.device), task.settings, read_cache=False):
                if isinstance(report, Finished):
                    heatmap = report.heatmap
                elif on_report is not None:
                    on_report(report)
            assert heatmap is not None
            write_outputs(heatmap, out_dir, task.stem, mpp=slide.mpp, min_area_um2=task.min_area_um2)
            return SlideOutcome(name, "done", "", **figures(heatmap, slide.mpp, model.meta), model_id=model.model_id,
                                seconds=round(time.perf_counter() - t0, 2), engine=engine)
    except UserError as exc:
        return SlideOutcome(name, "failed", _one_line(exc), seconds=round(time.perf_counter() - t0, 2), engine=engine)
    except Exception as exc:  # a decoder or a worker problem: this slide fails, the cohort goes on
        log.exception("slide %s failed", task.slide)
        return SlideOutcome(name, "failed", f"{type(exc).__name__}: {_one_line(exc)}",
                            seconds=round(time.perf_counter() - t0, 2), engine=engine)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()).rstrip(".") or type(exc).__name__


def write_summary(out_dir: Path, outcomes: Sequence[SlideOutcome], meta: dict[str, Any]) -> list[Path]:
    """cohort.csv (one row per slide, plain decimals) and cohort.json (rows and totals), atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for o in outcomes:
        w.writerow([_cell(getattr(o, c)) for c in COLUMNS])
    write_bytes(out_dir / SUMMARY_CSV, buf.getvalue().encode())
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    body = {**meta, "slides": len(outcomes), **counts, "rows": [asdict(o) for o in outcomes]}
    write_bytes(out_dir / SUMMARY_JSON, json.dumps(body, indent=1).encode())
    return [out_dir / SUMMARY_CSV, out_dir / SUMMARY_JSON]


def _cell(v: object) -> object:
    """A value as cohort.csv writes it: plain decimals, true / false, empty for unknown."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{v:.6f}".rstrip("0").rstrip(".") if isinstance(v, float) else v


def read_summary(path: Path) -> dict[str, SlideOutcome]:
    """Rows of a cohort.csv by slide file name (empty if absent or unreadable)."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return {}
    out = {}
    for r in rows:
        try:
            kw: dict[str, Any] = {}
            for f in fields(SlideOutcome):
                v = r.get(f.name, "")
                if f.type == "str":
                    kw[f.name] = v
                elif f.type == "bool | None":
                    kw[f.name] = {"true": True, "false": False}.get(v)
                else:
                    kw[f.name] = float(v) if v not in ("", None) else f.default
            out[kw["slide"]] = SlideOutcome(**kw)
        except (TypeError, ValueError):
            continue
    return out


def tasks_for(slides: Sequence[Path], out_dir: Path, model_path: str, **kw: Any) -> list[SlideTask]:
    return [SlideTask(str(s), str(out_dir), stem, model_path, **kw) for s, stem in zip(slides, output_stems(slides),
                                                                                        strict=True)]


def run_local(tasks: Sequence[SlideTask], model: LoadedModel | None = None,
              on_report: Callable[[int, object], None] | None = None) -> Iterator[tuple[int, SlideOutcome]]:
    """The local engine: slides one after the other in this process, the model loaded once."""
    for i, task in enumerate(tasks):
        cb = (lambda r, i=i: on_report(i, r)) if on_report is not None else None
        yield i, run_slide(task, model, "local", cb)
