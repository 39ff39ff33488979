"""Headless `train` and `ensemble` commands (argument parsing lives in viewer.cli)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from inference.model import SCAN_FAMILY, Architecture, ensemble, load_checkpoint, save_checkpoint
from inference.tasks import IDC, task_of
from resources import model_path
from training.loop import DoneReport, EpochReport, StepReport, TrainConfig
from training.session import CompareReport, DataReport, FolderSource, SessionConfig
from training.session import run as run_session

DEMO_PATIENT = "8975"


def folder_sources(args: Any, folders: Any = None) -> tuple[FolderSource, ...]:
    return tuple(FolderSource(str(d), tuple(args.exclude_patient), args.limit_per_patient)
                 for d in (args.data if folders is None else folders))


def run_train(args: Any) -> int:
    if args.distill is not None and not args.teacher:
        raise ValueError("--distill sets the teacher's share of the targets; give the teacher with --teacher.")
    if args.init and args.model_mpp is not None:
        raise ValueError("A fine-tuned model keeps its start model's resolution; leave out --model-mpp with --init.")
    if args.test_data and not args.val_data:
        raise ValueError("--test-data goes with --val-data, the data set's own split.")
    init = str(model_path(args.init)) if args.init else None  # a shipped model's name or a file
    task = task_of(load_checkpoint(init).meta.task if init else args.task)
    if args.model_mpp is not None and task is not IDC and args.model_mpp != task.mpp:
        raise ValueError(f"The {task.name} task's images are read as they are, at {task.mpp:g} um/px; leave out --model-mpp.")
    margin = args.margin if args.margin is not None else (TrainConfig.margin if task is IDC else task.margin)
    scan = args.arch == SCAN_FAMILY  # blocks of the task's cell, the margin in whole cells
    if scan and margin % task.patch_size:
        raise ValueError(f"A scan network needs a margin of whole cells; {margin} px is not a multiple of the "
                         f"{task.patch_size} px cell.")
    config = TrainConfig(
        out=args.out,
        arch=Architecture(args.depth, args.widen, args.dropout, family=args.arch, stem_stride=args.stem_stride,
                          block=task.patch_size if scan else 0, side=1 + 2 * margin // task.patch_size if scan else 0),
        epochs=args.epochs,
        samples_per_epoch=args.samples_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
        init=init,
        imagenet=args.imagenet,
        margin=margin,
        mpp=(TrainConfig.mpp if task is IDC else task.mpp) if args.model_mpp is None else args.model_mpp,
        freeze_trunk=args.freeze_trunk,
        augment=not args.no_augment,
        jpeg_augment=not args.no_jpeg_augment,
        val_jpeg_quality=args.val_jpeg_quality or None,
        resume=args.resume,
        num_threads=args.threads,
        teacher=args.teacher,
        distill=TrainConfig.distill if args.distill is None else args.distill,
        hard_negatives=args.hard_negatives,
        task=task.name,
    )
    session = SessionConfig(folder_sources(args), config, args.val_fraction, args.test_fraction,
                            split_from=args.split_from, val_sources=folder_sources(args, args.val_data),
                            test_sources=folder_sources(args, args.test_data))
    bar = None
    done: DoneReport | None = None
    for report in run_session(session):
        if isinstance(report, DataReport):
            for name, counts in report.counts.items():
                print(f"{name}: {counts}", file=sys.stderr)
            print(f"loaded in {report.load_s:.1f} s", file=sys.stderr)
        elif isinstance(report, StepReport):
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
        elif isinstance(report, DoneReport):
            done = report
        elif isinstance(report, CompareReport) and report.test is not None and done is not None:
            print("held-out test patients: " + json.dumps(report.test["patient_weighted"]), file=sys.stderr)
            _append_test_metrics(Path(done.checkpoint), report.test)
    assert done is not None
    print(f"saved {done.checkpoint} (best epoch {done.best_epoch})", file=sys.stderr)
    return 0


def _append_test_metrics(path: Path, test: dict[str, Any]) -> None:
    """Store held-out test metrics in the checkpoint's metadata (rewritten atomically)."""
    model = load_checkpoint(path)
    meta = replace(model.meta, metrics={**model.meta.metrics, "test": test})
    save_checkpoint(path, model.net, meta)


def run_ensemble(args: Any) -> int:
    """Join trained networks into one uncalibrated model."""
    models = [load_checkpoint(m) for m in args.models]
    net, meta = ensemble(models, args.weights or [1.0] * len(models))
    save_checkpoint(args.out, net, meta)
    weights = " / ".join(f"{m.weight:g}" for m in meta.members)
    print(f"wrote {args.out}: {meta.name}, weights {weights}, input {meta.input_px} px; "
          f"calibrate it before use (idc-viewer calibrate DATA --model {args.out} --out CALIBRATED)", file=sys.stderr)
    return 0
