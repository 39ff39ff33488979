"""Headless `train` and `evaluate` commands (argument parsing lives in viewer.cli)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from inference.model import Architecture, load_checkpoint, pick_device, shipped_model_path
from training.data import PatchSet, load_folder, split_groups
from training.loop import DoneReport, EpochReport, StepReport, TrainConfig, evaluate_model, fit

DEMO_PATIENT = "8975"


@dataclass(frozen=True)
class Split:
    train: PatchSet
    val: PatchSet
    test: PatchSet


def patient_split(data: PatchSet, val: float, test: float, seed: int) -> Split:
    """Train/validation/test split by patient (stratified by each patient's IDC fraction)."""
    parts = split_groups(data.groups, data.labels, [1 - val - test, val, test], seed)
    return Split(*(data.subset(m) for m in parts))


def load_sources(folders: list[str], exclude: list[str], limit_per_patient: int | None, seed: int) -> PatchSet:
    t = time.perf_counter()
    parts = [load_folder(f, exclude_patients=exclude, limit_per_patient=limit_per_patient, seed=seed) for f in folders]
    data = PatchSet.concat(parts)
    print(f"loaded {len(data)} patches from {len(np.unique(data.groups.astype(str)))} patients "
          f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return data


def run_train(args: Any) -> int:
    data = load_sources(args.data, args.exclude_patient, args.limit_per_patient, args.seed)
    split = patient_split(data, args.val_fraction, args.test_fraction, args.seed)
    for name, part in (("train", split.train), ("val", split.val), ("test", split.test)):
        print(f"{name}: {part.summary()}", file=sys.stderr)
    config = TrainConfig(
        out=args.out,
        arch=Architecture(args.depth, args.widen, args.dropout),
        epochs=args.epochs,
        samples_per_epoch=args.samples_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
        init=args.init,
        freeze_trunk=args.freeze_trunk,
        augment=not args.no_augment,
        resume=args.resume,
        num_threads=args.threads,
    )
    provenance = {
        "data": [str(Path(d).resolve()) for d in args.data],
        "excluded_patients": list(args.exclude_patient),
        "split": {k: getattr(split, k).summary() for k in ("train", "val", "test")},
        "val_patients": sorted(set(split.val.groups.astype(str).tolist())),
        "test_patients": sorted(set(split.test.groups.astype(str).tolist())),
        "init": args.init,
    }
    bar = None
    done: DoneReport | None = None
    for report in fit(config, split.train, split.val, provenance):
        if isinstance(report, StepReport):
            if bar is None:
                bar = tqdm(total=report.steps, desc=f"epoch {report.epoch + 1}", unit="batch", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(loss=f"{report.loss:.3f}", pps=f"{report.patches_per_s:.0f}")
        elif isinstance(report, EpochReport):
            if bar is not None:
                bar.close()
                bar = None
            v = report.val
            print(f"epoch {report.epoch}/{report.epochs}: train loss {report.train_loss:.4f}, "
                  f"val loss {report.val_loss:.4f}, bal.acc {v['balanced_accuracy']:.4f}, "
                  f"F1 {v['f1']:.4f}, AUC {v['auc']:.4f}{' (best)' if report.best else ''}, "
                  f"ETA {report.eta_s / 60:.1f} min", file=sys.stderr)
        else:
            done = report
    assert done is not None
    model = load_checkpoint(done.checkpoint)
    if len(split.test):
        test = evaluate_model(model, split.test, pick_device(args.device))
        print("held-out test patients: " + json.dumps(test["patient_weighted"]), file=sys.stderr)
        _append_test_metrics(Path(done.checkpoint), test)
    print(f"saved {done.checkpoint} (best epoch {done.best_epoch})", file=sys.stderr)
    return 0


def _append_test_metrics(path: Path, test: dict[str, Any]) -> None:
    """Store held-out test metrics in the checkpoint's metadata (rewritten atomically)."""
    from dataclasses import replace

    from inference.model import save_checkpoint

    model = load_checkpoint(path)
    meta = replace(model.meta, metrics={**model.meta.metrics, "test": test})
    save_checkpoint(path, model.net, meta)


def run_evaluate(args: Any) -> int:
    model_path = args.model or shipped_model_path()
    device = pick_device(args.device)
    model = load_checkpoint(model_path, device)
    data = load_sources(args.data, args.exclude_patient, args.limit_per_patient, 0)
    report = evaluate_model(model, data, device)
    m = report["patch"]
    if args.json:
        keys = ("n", "accuracy", "balanced_accuracy", "f1", "auc")
        out = {k: m[k] for k in keys}
        out["patient_weighted"] = {k: report["patient_weighted"][k] for k in keys[1:]}
        out["threshold"] = model.meta.threshold
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
