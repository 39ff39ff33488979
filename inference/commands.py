"""Headless `predict` command: heatmap .npz, colour-mapped .png and per-patch .csv per slide."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from inference.annotation_io import dumps_geojson, read_file
from inference.annotations import AnnotationError, AnnotationStore, regions_from_heatmap
from inference.atomic import atomic_path, write_bytes
from inference.domain import warnings as domain_warnings
from inference.export import export_regions
from inference.heatmap import DEFAULT_COLORMAP, Heatmap
from inference.model import load_checkpoint, pick_device
from inference.predict import BatchResult, PredictSettings
from inference.session import Planned, infer
from inference.slide import SlideError, open_slide
from resources import shipped_model_path

log = logging.getLogger(__name__)


def write_outputs(heatmap: Heatmap, out_dir: Path, stem: str, colormap: str = DEFAULT_COLORMAP,
                  mpp: float | None = None, min_area_um2: float = 0.0) -> list[Path]:
    """Write <stem>.heatmap.npz/.heatmap.png/.patches.csv and IDC regions <stem>.idc.geojson."""
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = heatmap.save(out_dir / f"{stem}.heatmap.npz")
    png = out_dir / f"{stem}.heatmap.png"
    with atomic_path(png) as tmp:
        Image.fromarray(heatmap.to_rgba(colormap)).save(tmp)
    csv_path = out_dir / f"{stem}.patches.csv"
    rows, cols = np.nonzero(heatmap.patch_done)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["row", "col", "x_l0", "y_l0", "w_l0", "h_l0", "prob_idc"])
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            rect = heatmap.grid.patch_rect(r, c)
            w.writerow([r, c, rect.x, rect.y, rect.w, rect.h, f"{heatmap.patch_prob[r, c]:.6f}"])
    regions = regions_from_heatmap(heatmap, heatmap.threshold, min_area_um2, mpp)
    geojson = out_dir / f"{stem}.idc.geojson"
    write_bytes(geojson, dumps_geojson(regions, AnnotationStore()))
    return [npz, png, csv_path, geojson]


def run_predict(args: Any) -> int:
    device = pick_device(args.device)
    model = load_checkpoint(args.model or shipped_model_path(), device)
    settings = PredictSettings(stride_px=args.stride, batch_size=args.batch_size)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)  # an unwritable folder fails now, not after the work
    failures = 0
    for slide_path in args.slides:
        try:
            slide = open_slide(slide_path, mpp=args.mpp)
        except SlideError as exc:
            print(f"idc-viewer predict: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        with slide:
            if slide.mpp is None:
                print(f"idc-viewer predict: error: {Path(slide_path).name} has no resolution (MPP); "
                      "pass --mpp UM.", file=sys.stderr)
                failures += 1
                continue
            heatmap = None
            with tqdm(desc=Path(slide_path).name, unit="patch", file=sys.stderr) as bar:
                for report in infer(slide, model, device, settings, read_cache=not args.no_cache):
                    if isinstance(report, Planned):
                        bar.reset(total=report.total)
                        bar.update(report.resumed)
                    elif isinstance(report, BatchResult):
                        bar.update(len(report.rows))
                    else:
                        heatmap = report.heatmap
            assert heatmap is not None
            paths = write_outputs(heatmap, out_dir, Path(slide_path).stem, mpp=slide.mpp,
                                  min_area_um2=args.min_area)
            print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
            for text in domain_warnings(slide.mpp, model.meta, heatmap.domain_score):
                print(f"idc-viewer predict: warning: {Path(slide_path).name}: {text}", file=sys.stderr)
    return 1 if failures else 0


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
