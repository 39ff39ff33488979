"""Headless `evaluate` and `calibrate` commands (argument parsing lives in viewer.cli).

`evaluate` measures a model three ways: on patch folders (optionally after a JPEG round trip),
on each patient's slide rebuilt from its patches as a JPEG pyramid (`--as-slides`, with
`--idc-free` also without its IDC patches), and on a lab's own slides with IDC / Non-IDC ground
truth (`SLIDE... --truth FILE`). `calibrate` chooses the model's calls (tissue context,
thresholds and their floor, slide score and call) on rebuilt validation slides with and without
their IDC (inference.calibration) and writes them into a copy of the checkpoint.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from inference.annotation_io import dumps_geojson
from inference.annotations import AnnotationStore
from inference.atomic import write_bytes
from inference.calibration import IDC_FREE_WEIGHT, Calibration, calibrate
from inference.calls import call_text
from inference.domain import colour_groups, fit_domain, patch_stats
from inference.heatmap import Heatmap
from inference.model import (
    LoadedModel,
    ModelMeta,
    load_checkpoint,
    pick_device,
    save_checkpoint,
)
from inference.patches import centre
from inference.slide import SlideError, open_slide
from inference.slide_eval import (
    METRIC_KEYS,
    SlideResult,
    calls_summary,
    compute_heatmap,
    evaluate_heatmap,
    summary,
)
from inference.tasks import IDC
from inference.truth import (
    DISAGREEMENT_CLASSES,
    FALSE_IDC,
    MISSED_IDC,
    Truth,
    TruthError,
    cell_truth,
    disagreements,
    labels_path,
    load_truth,
)
from resources import model_path
from training.augment import jpeg_batch
from training.loop import evaluate_model
from training.rebuild import rebuild_slides
from training.session import FolderSource, load_sources


def _patients(args: Any, model: LoadedModel) -> list[str] | None:
    """Patients chosen by --patient or by --patients val|test (the model's recorded split)."""
    chosen = list(args.patient or [])
    if args.patients in ("val", "test"):
        recorded = model.meta.provenance.get(f"{args.patients}_patients")
        if not recorded:
            raise ValueError(f"The model does not record its {args.patients} patients; use --patient ID.")
        chosen += [str(p) for p in recorded]
    return chosen or None


def _truth_beside(slide_path: Path) -> Path:
    for cand in (labels_path(slide_path), slide_path.with_name(slide_path.name + ".annotations.geojson"),
                 slide_path.with_suffix(".geojson"), slide_path.with_suffix(".xml")):
        if cand.exists():
            return cand
    raise TruthError(f"{slide_path.name} has no ground truth beside it; pass --truth FILE.")


def _slides_with_truth(args: Any) -> Iterator[tuple[str, Path, Truth, bool]]:
    """Every slide with its truth, all truth files read before any slide is computed."""
    slides = [Path(s) for s in args.data]
    truths = [Path(t) for t in (args.truth or [])]
    if truths and len(truths) != len(slides):
        raise ValueError(f"Give one --truth file per slide ({len(slides)} slides, {len(truths)} truth files).")
    items = [(p.name, p, load_truth(truths[i] if truths else _truth_beside(p)), False) for i, p in enumerate(slides)]
    return iter(items)


def _rebuilt(args: Any, model: LoadedModel, out_dir: Path,
             idc_free: bool = False) -> Iterator[tuple[str, Path, Truth, bool]]:
    """Each chosen patient's rebuilt slide, then (``idc_free``) each one's IDC-free slide."""
    quality = args.jpeg_quality if args.jpeg_quality is not None else 80
    patients = _patients(args, model)
    for free in (False, True) if idc_free else (False,):
        for root in args.data:
            for rs in rebuild_slides(root, out_dir, quality or None, patients, args.exclude_patient, idc_free=free):
                yield f"patient {rs.patient}{' IDC-free' if free else ''}", rs.path, rs.truth, free


def _run_slides(items: Iterator[tuple[str, Path, Truth, bool]], model: LoadedModel, args: Any,
                keep: bool = False) -> tuple[list[SlideResult], list[Heatmap], list[Truth]]:
    device = pick_device(args.device)
    review = getattr(args, "disagreements", None)
    results, heatmaps, truths, written = [], [], [], []
    bar = tqdm(desc="slides", unit="slide", file=sys.stderr, disable=getattr(args, "json", False))
    for name, path, truth, idc_free in items:
        t = time.perf_counter()
        try:
            with open_slide(path, mpp=args.mpp) as slide:
                heatmap = compute_heatmap(slide, model, device)
        except SlideError as exc:
            print(f"idc-viewer {args.command}: skipped {name}: {exc}", file=sys.stderr)
            continue
        finally:
            bar.update(1)
        results.append(evaluate_heatmap(name, heatmap, truth, time.perf_counter() - t, idc_free))
        if review:
            written.append(write_disagreements(Path(review), path, heatmap, truth))
        if keep:
            heatmaps.append(heatmap)
            truths.append(truth)
    bar.close()
    if not results:
        raise ValueError("No slide could be evaluated.")
    if written:
        print(f"idc-viewer {args.command}: wrote {len(written)} disagreement file{'s' if len(written) > 1 else ''} "
              f"to {review} (regions '{FALSE_IDC}' and '{MISSED_IDC}'; import each with its slide to review them)",
              file=sys.stderr)
    return results, heatmaps, truths


def write_disagreements(out_dir: Path, slide_path: Path, heatmap: Heatmap, truth: Truth) -> Path:
    """``<slide stem>.disagreements.geojson`` in ``out_dir``: the regions where the map shown
    disagrees with the truth (QuPath GeoJSON, level-0 coordinates)."""
    labels, _ = cell_truth(heatmap.grid, truth)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_bytes(out_dir / f"{slide_path.stem}.disagreements.geojson",
                       dumps_geojson(disagreements(heatmap, labels), AnnotationStore(classes=DISAGREEMENT_CLASSES)))


def _fmt(v: float | None) -> str:
    return "   -  " if v is None or not np.isfinite(v) else f"{v:6.3f}"


def _print_slides(results: list[SlideResult], model: LoadedModel) -> None:
    has_ctx = any(r.context is not None for r in results)
    print(f"model {model.model_id}; cells compared per slide at the model's threshold "
          f"({'context map' if has_ctx else 'per-patch map'}{', per-patch map in brackets' if has_ctx else ''})")
    positive = model.meta.positive_class
    print(f"{'slide':28}{'cells':>7}{'IDC':>7}{'AUC':>8}{'bal.acc':>9}{'F1':>8}{'sens':>8}{'spec':>8}{'thresh':>8}"
          f"{'called':>8}{'area':>7}{'score':>7}  call")
    for r in results:
        a = r.shown
        if a is None:
            print(f"{r.name:28}{0:7d}")
            continue
        m = a.metrics
        extra = f"   ({_fmt(r.raw.metrics.auc)} {_fmt(r.raw.metrics.balanced_accuracy)})" if has_ctx and r.raw else ""
        call = call_text(r.slide_call, positive) if r.slide_call else "-"
        print(f"{r.name[:27]:28}{a.cells:7d}{a.idc_cells:7d}  {_fmt(m.auc)}   {_fmt(m.balanced_accuracy)}  "
              f"{_fmt(m.f1)}  {_fmt(m.sensitivity)}  {_fmt(m.specificity)}  {_fmt(m.threshold)}"
              f"  {_fmt(r.called_share)} {_fmt(r.area_ratio)} {_fmt(r.slide_score)}  {call}{extra}")
    means = (("mean", "shown"), *((("mean, per-patch map", "raw"),) if has_ctx else ()),
             ("mean away from region borders", "away_from_borders"))
    for label, which in means:
        s = summary(results, which)
        print(f"{label} over {s['slides_with_both_classes']} slides with both classes "
              f"(F1 over {s['slides_for_f1']} with >= 10% IDC; {s['cells']} cells): "
              + ", ".join(f"{k} {_fmt(s[k]).strip()}" for k in METRIC_KEYS))
    print("(away from region borders: cells touching a cell of the other class are left out, "
          "where hand-drawn truth is least certain)")
    c = calls_summary(results)
    print(f"calls: area called / labelled, median {_fmt(c['area_ratio_median']).strip()} over "
          f"{c['slides_with_idc']} slides with {positive} ({_fmt(c['area_ratio_median_for_f1']).strip()} over those "
          f"with >= 10%); slide calls {_calls(c['calls_slides_with_idc'], positive)}")
    if c["idc_free_slides"]:
        print(f"{positive}-free slides ({c['idc_free_slides']}): tissue called {positive} "
              f"{_fmt(c['idc_free_called_mean']).strip()} mean, {_fmt(c['idc_free_called_max']).strip()} at most, "
              f"{c['idc_free_over_8_percent']} above 8%; slide calls {_calls(c['calls_idc_free'], positive)}; "
              f"slides with {positive} ranked above {positive}-free ones by slide score: pair AUC "
              f"{_fmt(c.get('slide_score_pair_auc')).strip()}")


def _calls(counts: dict[str, int], positive: str) -> str:
    return ", ".join(f"{call_text(k, positive)} {n}" for k, n in counts.items())


def _slide_report(results: list[SlideResult], model: LoadedModel) -> dict[str, Any]:
    return {"model": model.model_id, "threshold": model.meta.threshold,
            "context_sigma": model.meta.context_sigma, "context_threshold": model.meta.context_threshold,
            "threshold_adapt": model.meta.threshold_adapt,
            "slides": [r.as_dict() for r in results],
            "mean": summary(results, "shown"), "mean_per_patch_map": summary(results, "raw"),
            "mean_away_from_borders": summary(results, "away_from_borders"), "calls": calls_summary(results)}


def run_evaluate(args: Any) -> int:
    paths = [Path(p) for p in args.data]
    folders = [p for p in paths if p.is_dir()]
    if folders and len(folders) != len(paths):
        raise ValueError("Give either patch folders or slide files, not both.")
    if args.idc_free and not args.as_slides:
        raise ValueError("--idc-free rebuilds slides: add --as-slides.")
    if folders and args.disagreements and not args.as_slides:
        raise ValueError("--disagreements needs slides: add --as-slides to rebuild the patients' slides.")
    model = load_checkpoint(model_path(args.model), pick_device(args.device))
    if not folders or args.as_slides:
        with tempfile.TemporaryDirectory(prefix="idc-eval-") as tmp:
            # Disagreements are reviewed on their slides: rebuilt slides are kept beside them.
            keep = args.keep_slides or args.disagreements
            items = _rebuilt(args, model, Path(keep or tmp), args.idc_free) if folders else _slides_with_truth(args)
            results, _, _ = _run_slides(items, model, args)
        if args.json:
            print(json.dumps(_slide_report(results, model)))
        else:
            _print_slides(results, model)
        return 0
    return _evaluate_patches(args, model)


def _evaluate_patches(args: Any, model: LoadedModel) -> int:
    t = time.perf_counter()
    patients = _patients(args, model)
    sources = tuple(FolderSource(str(d), tuple(args.exclude_patient), args.limit_per_patient,
                                 None if patients is None else tuple(patients)) for d in args.data)
    data, _ = load_sources(sources, model.meta)
    if not len(data):
        raise ValueError("No patches of the chosen patients were found.")
    if args.jpeg_quality:
        data = replace(data, images=jpeg_batch(data.images, args.jpeg_quality))
    print(f"loaded {len(data)} patches from {len(np.unique(data.groups.astype(str)))} patients "
          f"in {time.perf_counter() - t:.1f} s{f', JPEG quality {args.jpeg_quality}' if args.jpeg_quality else ''}",
          file=sys.stderr)
    report = evaluate_model(model, data, pick_device(args.device))
    m = report["patch"]
    if args.json:
        keys = ("n", "accuracy", "balanced_accuracy", "f1", "auc")
        out = {k: m[k] for k in keys}
        out["patient_weighted"] = {k: report["patient_weighted"][k] for k in keys[1:]}
        out["threshold"] = model.meta.threshold
        out["jpeg_quality"] = args.jpeg_quality
        out["model"] = model.model_id
        print(json.dumps(out))
    else:
        pw = report["patient_weighted"]
        print(f"model {model.model_id}, threshold {model.meta.threshold:.2f}, {m['n']} patches, "
              f"{report['groups']} patients")
        print(f"{'':18}{'per patch':>12}{'patient-weighted':>18}")
        for k in ("accuracy", "balanced_accuracy", "f1", "auc", "sensitivity", "specificity"):
            print(f"{k:18}{m[k]:12.4f}{pw[k]:18.4f}")
        print(f"confusion (per patch): TN {m['tn']:.0f}  FP {m['fp']:.0f}  FN {m['fn']:.0f}  TP {m['tp']:.0f}")
    return 0


#: Patches per training patient for the domain statistics (enough for a stable median).
DOMAIN_PATCHES_PER_PATIENT = 60


def training_domain(args: Any, model: LoadedModel) -> dict[str, Any]:
    """Colour statistics (inference.domain) of the model's training patients, as JPEG q80 patches."""
    held_out = {str(p) for key in ("val_patients", "test_patients") for p in model.meta.provenance.get(key, ())}
    # The statistics describe each cell's own colours, so the patches are loaded alone, without
    # the margin a model may see around them (no mosaics to build).
    data, _ = load_sources([FolderSource(str(d), tuple(args.exclude_patient), DOMAIN_PATCHES_PER_PATIENT)
                            for d in args.data], ModelMeta(patch_size=model.meta.patch_size, mpp=model.meta.mpp))
    train = data.subset(~np.isin(data.groups.astype(str), list(held_out)))
    if not len(train):
        raise ValueError("No training patients are left in these folders to describe the model's domain.")
    return fit_domain(patch_stats(jpeg_batch(train.images, 80)), train.groups.astype(str))


#: Patches a labelled-image data set gives its domain statistics, and the colour groups that
#: stand in for the slides it does not name (inference.domain.colour_groups).
DOMAIN_PATCHES, DOMAIN_GROUPS, DOMAIN_RIDGE = 8000, 64, 0.01


def labelled_domain(args: Any, model: LoadedModel) -> dict[str, Any]:
    """Colour statistics of a labelled-image training set (each cell's own pixels, JPEG q80)."""
    data, _ = load_sources([FolderSource(str(d)) for d in args.data], model.meta)
    if not len(data):
        raise ValueError("No training images were found to describe the model's domain.")
    pick = np.sort(np.random.default_rng(0).permutation(len(data))[:DOMAIN_PATCHES])
    stats = patch_stats(centre(jpeg_batch(data.images[pick], 80), data.margin))
    domain = fit_domain(stats, colour_groups(stats, DOMAIN_GROUPS), ridge=DOMAIN_RIDGE)
    return {**domain, "images": len(pick)}


def run_calibrate(args: Any) -> int:
    """Choose the model's calls on rebuilt validation slides with and without their IDC; write a
    calibrated copy of the model. A model of another task (its threshold chosen on its data set's
    validation images while it trained) gets its domain statistics only."""
    model = load_checkpoint(model_path(args.model), pick_device(args.device))
    if model.meta.task != IDC.name:
        domain = labelled_domain(args, model)
        save_checkpoint(args.out, model.net, replace(model.meta, domain=domain))
        print(f"wrote {args.out}: threshold {model.meta.threshold:.2f} (chosen on validation while training), "
              f"domain limit {domain['score_limit']:.2f} over {domain['patients']} colour groups of "
              f"{domain['images']} training images", file=sys.stderr)
        return 0
    raw = replace(model, meta=replace(model.meta, context_sigma=0.0, context_threshold=None, threshold_adapt={},
                                      slide_call={}))
    with tempfile.TemporaryDirectory(prefix="idc-calibrate-") as tmp:
        results, heatmaps, truths = _run_slides(_rebuilt(args, model, Path(tmp), idc_free=True), raw, args, keep=True)
    free = [r.idc_free for r in results]
    weight = IDC_FREE_WEIGHT if args.idc_free_weight is None else args.idc_free_weight
    if not 0 <= weight < 1:
        raise ValueError(f"--idc-free-weight is a share of the objective, 0 up to 1, not {weight:g}.")
    cal = calibrate([h for h, f in zip(heatmaps, free, strict=True) if not f],
                    [t for t, f in zip(truths, free, strict=True) if not f],
                    [h for h, f in zip(heatmaps, free, strict=True) if f], idc_free_weight=weight)
    _print_calibration(cal)
    domain = training_domain(args, model)
    meta = replace(model.meta, threshold=cal.threshold, domain=domain,
                   context_sigma=cal.sigma, context_threshold=cal.context_threshold if cal.sigma else None,
                   threshold_adapt=asdict(cal.adapt) if cal.adapt else {},
                   slide_call=asdict(cal.slide_call) if cal.slide_call else {},
                   metrics={**model.meta.metrics, "calibration": {
                       "jpeg_quality": args.jpeg_quality if args.jpeg_quality is not None else 80,
                       "idc_free_weight": weight, "patients": sorted(r.name for r in results),
                       "table": cal.table, "slide_scores": cal.slide_scores}})
    save_checkpoint(args.out, model.net, meta)
    adapt, policy = cal.adapt, cal.slide_call
    floor = "" if adapt is None or adapt.min_shift is None else f" (never below {adapt.min_shift:+g} logit)"
    print(f"wrote {args.out}: threshold {cal.threshold:.2f}, context sigma {cal.sigma:g} cells"
          + (f", context threshold {cal.context_threshold:.2f}" if cal.sigma else "")
          + (f", following the slide's P{adapt.percentile:g} logit with slope {adapt.slope:g}{floor}" if adapt else "")
          + (f", slide score from the top {policy.top_cells} cells (found >= {policy.high:.2f}, "
             f"nothing called < {policy.low:.2f})" if policy else "")
          + f", domain limit {domain['score_limit']:.2f} over {domain['patients']} training patients", file=sys.stderr)
    return 0


def _print_calibration(cal: Calibration) -> None:
    """The table of candidates, on stderr."""
    first = cal.table[0]
    print(f"{'sigma':>6}{'threshold':>11}{'follows':>9}{'slope':>7}{'floor':>7}{'objective':>11}{'left out':>10}"
          f"{'F1':>7}{'area':>7}{'free':>7}{'free max':>9}{'bal.acc':>9}{'AUC':>8}   (over {first['slides']} "
          f"validation slides and {first['idc_free_slides']} IDC-free ones; objective: F1 and IDC-free tissue "
          "left clear; 'left out': each slide judged at the setting chosen on the others)", file=sys.stderr)
    for row in cal.table:
        follows = "-" if row["percentile"] is None else f"P{row['percentile']:g}"
        floor = "-" if row["min_shift"] is None else f"{row['min_shift']:+g}"
        print(f"{row['sigma']:6.2f}{row['threshold']:11.2f}{follows:>9}{row['slope']:7.2f}{floor:>7}"
              f"{row['objective']:11.4f}{row['loo_objective']:10.4f} {_fmt(row['f1'])} {_fmt(row['area_ratio'])} "
              f"{_fmt(row['idc_free_called'])}  {_fmt(row['idc_free_called_max'])}  {_fmt(row['balanced_accuracy'])} "
              f"{_fmt(row['auc'])}", file=sys.stderr)
    if cal.slide_scores:
        print("slide score: pair AUC of slides with IDC over IDC-free ones by the mean of the top k cells: "
              + ", ".join(f"k={k} {a:.3f}" for k, a in cal.slide_scores["pair_auc_by_top_cells"].items()),
              file=sys.stderr)
