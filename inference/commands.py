"""Headless `predict` and `export` commands: per slide heatmap .npz/.png/.csv/.geojson, and the cohort summary."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from inference import cohort
from inference.annotation_io import read_file
from inference.annotations import AnnotationError, AnnotationStore
from inference.domain import warnings as domain_warnings
from inference.export import export_regions
from inference.heatmap import Heatmap, load_matching
from inference.model import LoadedModel, load_checkpoint, pick_device
from inference.predict import BatchResult, PredictSettings
from inference.session import Planned
from inference.slide import open_slide
from resources import SHIPPED_MODELS
from resources import model_path as resolve_model

log = logging.getLogger(__name__)


def run_predict(args: Any) -> int:
    """Heatmaps of slides and folders of slides, on the local engine or on Ray; cohort summary."""
    slides = cohort.find_slides(args.slides)
    if not slides:
        raise cohort.CohortError("No slide files were found in the paths given.")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)  # an unwritable folder fails now, not after the work
    model_path = str(resolve_model(args.model))
    device = pick_device(args.device)
    model = load_checkpoint(model_path, device, trust_torchscript=args.trust_torchscript)
    settings = PredictSettings(stride_px=args.stride, batch_size=args.batch_size)
    tasks = cohort.tasks_for(slides, out_dir, model_path, settings=settings, mpp=args.mpp, device=args.device,
                             min_area_um2=args.min_area, trust_torchscript=args.trust_torchscript)
    if args.no_cache:
        for t in tasks:
            (out_dir / f"{t.stem}.heatmap.npz").unlink(missing_ok=True)
    outcomes: list[cohort.SlideOutcome | None] = [None] * len(tasks)
    meta = {"model": model.model_id, "engine": args.engine, "out": str(out_dir)}
    slide_bar = tqdm(total=len(tasks), desc="slides", unit="slide", file=sys.stderr, disable=None)
    patch_bar = tqdm(desc="patches", unit="patch", file=sys.stderr, disable=None, leave=False)

    def on_report(_i: int, report: object) -> None:
        if isinstance(report, Planned):
            patch_bar.reset(total=report.total)
            patch_bar.update(report.resumed)
        elif isinstance(report, BatchResult):
            patch_bar.update(len(report.rows))

    if args.engine == "ray":
        from inference.cohort_ray import run_ray

        results = run_ray(tasks, args.address, args.workers)
    else:
        results = cohort.run_local(tasks, model, on_report)
    try:
        for i, outcome in results:
            outcomes[i] = outcome
            slide_bar.update(1)
            name = Path(tasks[i].slide).name
            if outcome.status == "failed":
                print(f"idc-viewer predict: error: {name}: {outcome.reason}.", file=sys.stderr)
            elif outcome.status == "skipped":
                print(f"idc-viewer predict: {name}: skipped, {outcome.reason}.", file=sys.stderr)
            if outcome.status != "failed":
                _print_domain_warnings(out_dir / f"{tasks[i].stem}.heatmap.npz", name, model)
            cohort.write_summary(out_dir, [o for o in outcomes if o is not None], meta)
    finally:
        patch_bar.close()
        slide_bar.close()
    done = [o for o in outcomes if o is not None]
    print(f"idc-viewer predict: {sum(o.status == 'done' for o in done)} computed, "
          f"{sum(o.status == 'skipped' for o in done)} skipped, {sum(o.status == 'failed' for o in done)} failed; "
          f"summary in {out_dir / cohort.SUMMARY_CSV}", file=sys.stderr)
    return 1 if any(o.status == "failed" for o in done) else 0


def _print_domain_warnings(npz: Path, name: str, model: LoadedModel) -> None:
    heatmap = load_matching(npz)
    if heatmap is None:
        return
    for text in domain_warnings(heatmap.grid.slide_mpp, model.meta, heatmap.domain_score(model.meta.domain)):
        print(f"idc-viewer predict: warning: {name}: {text}", file=sys.stderr)


def run_export(args: Any) -> int:
    """Crops, masks and the report of an annotation file's regions, headless."""
    try:
        imported = read_file(args.annotations)
    except AnnotationError as exc:
        print(f"idc-viewer export: error: {exc}", file=sys.stderr)
        return 2
    for line in imported.skipped:
        print(f"idc-viewer export: skipped {line}", file=sys.stderr)
    store = AnnotationStore()
    for c in imported.classes:
        store.ensure_class(c.name, c.color)
    annotations = [a for a in imported.annotations if args.cls is None or a.cls in args.cls]
    with open_slide(args.slide, mpp=args.mpp) as slide:
        heatmap = Heatmap.load(args.heatmap) if args.heatmap else None
        if heatmap is not None and heatmap.info.slide_fingerprint != slide.fingerprint():
            print("idc-viewer export: error: the heatmap was computed on another slide.", file=sys.stderr)
            return 2
        paths = export_regions(slide, annotations, Path(args.out), args.mpp_out, args.overlay, heatmap, store)
    n = len(annotations)
    print(f"wrote {len(paths)} files to {args.out} ({n} region{'' if n == 1 else 's'})", file=sys.stderr)
    return 0


def run_export_model(args: Any) -> int:
    """Write a model in WSInfer's format (config.json + TorchScript)."""
    from inference.wsinfer import export

    path = resolve_model(args.model)
    model = load_checkpoint(path)
    name = args.model if args.model in SHIPPED_MODELS else path.stem
    files = export(model, args.out, name)
    print(f"idc-viewer export-model: wrote {', '.join(str(f) for f in files)} ({model.meta.input_px} px patches at "
          f"{model.meta.mpp:g} um/px, classes {' / '.join(model.meta.classes)}); the format does not carry the "
          "context map, thresholds or slide call", file=sys.stderr)
    return 0
