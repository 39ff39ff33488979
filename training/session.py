"""A training session: load sources, split by group, fit, compare with the current model.

One generator drives both `idc-viewer train` and the GUI's training tab, so the two give the
same result for the same data, settings and seed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.annotations import Annotation
from inference.model import LoadedModel, ModelMeta, load_checkpoint, pick_device
from inference.slide import open_slide
from inference.tasks import IDC, Task, task_of
from training.data import PATCH, PatchSet, folder_factor, load_folder, split_groups
from training.labelled import load_labelled
from training.loop import DoneReport, EpochReport, StepReport, TrainConfig, evaluate_model, fit
from training.regions import class_labels, patches_from_annotations


@dataclass(frozen=True)
class FolderSource:
    """A patch folder: for the IDC task the Kaggle IDC layout (groups are patients), for the
    others labelled images (training.labelled: class folders or an id,label CSV)."""

    path: str
    exclude_patients: tuple[str, ...] = ()
    limit_per_patient: int | None = None
    patients: tuple[str, ...] | None = None  # only these, when given

    def describe(self) -> str:
        return f"patch folder {self.path}"


@dataclass(frozen=True)
class RegionSource:
    """IDC / Non-IDC regions of one slide (groups are the slide, or its regions)."""

    slide_path: str
    annotations: tuple[Annotation, ...]
    mpp: float | None = None
    group_by: str = "slide"

    def describe(self) -> str:
        return f"regions of {Path(self.slide_path).name}"


Source = FolderSource | RegionSource


@dataclass(frozen=True)
class SessionConfig:
    sources: tuple[Source, ...]
    train: TrainConfig
    val_fraction: float = 0.15
    test_fraction: float = 0.0
    compare_with: str | None = None  # the model in use, compared on the same validation data
    split_from: str | None = None  # reuse this checkpoint's validation and test patients
    #: The data set's own validation and test folders (PCam's split by slide): given, they are the
    #: validation and test data and ``sources`` all train.
    val_sources: tuple[Source, ...] = ()
    test_sources: tuple[Source, ...] = ()
    #: Already loaded models by path (the GUI's model in use), so none is read from disk twice.
    loaded: tuple[LoadedModel, ...] = ()

    def model(self, path: str) -> LoadedModel:
        """The model at ``path``: the loaded one when the caller passed it, else read once."""
        for m in self.loaded:
            if m.path is not None and str(m.path) == str(path):
                return m
        return load_checkpoint(path)


@dataclass(frozen=True)
class DataReport:
    """What was loaded and how it was split."""

    counts: dict[str, dict[str, int]]  # split -> {patches, idc, non_idc, groups}
    by_source: dict[str, dict[str, int]]  # source -> {patches, idc, non_idc, groups}
    val_groups: tuple[str, ...]
    test_groups: tuple[str, ...]
    load_s: float


@dataclass(frozen=True)
class CompareReport:
    """New and current model on the same validation data (patient-weighted metrics)."""

    new: dict[str, float]
    current: dict[str, float] | None
    test: dict[str, Any] | None = field(default=None)
    model: LoadedModel | None = field(default=None, compare=False)  # the new model, loaded once


def model_meta_for(config: SessionConfig) -> ModelMeta:
    """Working resolution, patch size and margin used to cut patches: the start model's, else
    the run's."""
    if config.train.init:
        return config.model(config.train.init).meta
    task = task_of(config.train.task)
    if task is not IDC:  # labelled images are the task's patches, at its resolution
        return ModelMeta(arch=config.train.arch, patch_size=task.patch_size, mpp=task.mpp, margin=config.train.margin,
                         classes=task.classes, task=task.name)
    k = folder_factor(config.train.mpp)
    return ModelMeta(arch=config.train.arch, patch_size=PATCH // k, mpp=config.train.mpp, margin=config.train.margin)


def load_sources(sources: Sequence[Source], meta: ModelMeta, seed: int = 0) -> tuple[PatchSet, dict[str, dict[str, int]]]:
    parts, by_source = [], {}
    for src in sources:
        if isinstance(src, FolderSource) and meta.task != IDC.name:
            data = load_labelled(src.path, task_for_data(meta))
        elif isinstance(src, FolderSource):
            # At a coarser resolution the patches and their margin are cut at the folder's and averaged down.
            k = folder_factor(meta.mpp)
            data = load_folder(src.path, src.exclude_patients, src.limit_per_patient, seed, meta.margin * k,
                               src.patients).averaged(k)
        else:
            with open_slide(src.slide_path, mpp=src.mpp) as slide:
                data = patches_from_annotations(slide, src.annotations, meta, class_labels(meta), src.group_by)
        parts.append(data)
        by_source[src.describe()] = data.summary()
    return PatchSet.concat(parts), by_source


def task_for_data(meta: ModelMeta) -> Task:
    """The task of ``meta``, checked against the geometry of its labelled data: such images are
    read as they are, so the model must work at their resolution and see no more than they hold."""
    task = task_of(meta.task)
    if abs(meta.mpp - task.mpp) > 1e-6 * task.mpp or meta.patch_size != task.patch_size or meta.margin > task.margin:
        raise ValueError(f"The {task.name} task's images are {task.patch_size + 2 * task.margin} px at {task.mpp:g} "
                         f"\u00b5m/px (a {task.patch_size} px centre); this model scores {meta.patch_size} px at "
                         f"{meta.mpp:g} \u00b5m/px with a {meta.margin} px margin.")
    return task


def split_of(checkpoint: str) -> tuple[set[str], set[str]]:
    """The validation and test patients recorded in a checkpoint, to compare two models fairly."""
    prov = load_checkpoint(checkpoint).meta.provenance
    val, test = prov.get("val_patients"), prov.get("test_patients")
    if not val:
        raise ValueError(f"{Path(checkpoint).name} does not record its validation patients.")
    return set(map(str, val)), set(map(str, test or ()))


def split(data: PatchSet, val: float, test: float, seed: int,
          fixed: tuple[set[str], set[str]] | None = None) -> tuple[PatchSet, PatchSet, PatchSet]:
    """Train / validation / test by group (patient, slide or region), never by patch.

    ``fixed`` gives the validation and test groups by name (every other group trains).
    """
    if fixed is not None:
        groups = data.groups.astype(str)
        in_val, in_test = np.isin(groups, list(fixed[0])), np.isin(groups, list(fixed[1]))
        parts = [data.subset(~in_val & ~in_test), data.subset(in_val), data.subset(in_test)]
        if not len(parts[0]) or not len(parts[1]):
            raise ValueError("The recorded split leaves no training or no validation patches in these data.")
        return parts[0], parts[1], parts[2]
    n_groups = len(np.unique(data.groups.astype(str)))
    needed = 2 + (1 if test > 0 else 0)
    if n_groups < needed:
        raise ValueError(
            f"The data hold {n_groups} patient/slide/region group(s); at least {needed} are needed to "
            "validate on groups the model did not train on (draw more regions or add a patch folder)."
        )
    fractions = [1 - val - test, val] + ([test] if test > 0 else [])
    masks = split_groups(data.groups, data.labels, fractions, seed)
    parts = [data.subset(m) for m in masks]
    if test <= 0:
        parts.append(data.subset(np.zeros(len(data), bool)))
    if not len(parts[1]) or not len(parts[0]):
        raise ValueError("The split left no training or no validation patches; add data or change the split.")
    return parts[0], parts[1], parts[2]


def prepare(config: SessionConfig) -> tuple[DataReport, PatchSet, PatchSet, PatchSet]:
    """Load the sources and split them: what a run would train, validate and test on."""
    t0 = time.perf_counter()
    meta = model_meta_for(config)
    data, by_source = load_sources(config.sources, meta, config.train.seed)
    if len(data) == 0:
        raise ValueError("No training patches were found in the chosen sources.")
    if config.val_sources:
        train = data
        val = load_sources(config.val_sources, meta, config.train.seed)[0]
        test = load_sources(config.test_sources, meta, config.train.seed)[0] if config.test_sources \
            else data.subset(np.zeros(len(data), bool))
    else:
        fixed = split_of(config.split_from) if config.split_from else None
        train, val, test = split(data, config.val_fraction, config.test_fraction, config.train.seed, fixed)
    report = DataReport(
        counts={"train": train.summary(), "val": val.summary(), "test": test.summary()},
        by_source=by_source,
        val_groups=tuple(sorted(set(val.groups.astype(str).tolist()))),
        test_groups=tuple(sorted(set(test.groups.astype(str).tolist()))),
        load_s=time.perf_counter() - t0,
    )
    return report, train, val, test


def count(config: SessionConfig) -> Iterator[DataReport]:
    """The data report of a run without training (the GUI's *Count patches* job)."""
    yield prepare(config)[0]


def run(config: SessionConfig) -> Iterator[DataReport | StepReport | EpochReport | DoneReport | CompareReport]:
    """Load, split, train and compare; each step is a small report."""
    report, train, val, test = prepare(config)
    yield report
    provenance = {
        "sources": [s.describe() for s in config.sources],
        "split": {"train": train.summary(), "val": val.summary(), "test": test.summary()},
        "val_patients": sorted(set(val.groups.astype(str).tolist())),
        "test_patients": sorted(set(test.groups.astype(str).tolist())),
        "init": config.train.init,
        "split_from": config.split_from,
    }
    done: DoneReport | None = None
    start = config.model(config.train.init) if config.train.init else None
    for report in fit(config.train, train, val, provenance, start):
        if isinstance(report, DoneReport):
            done = report
        yield report
    assert done is not None
    device = pick_device(config.train.device)
    new = load_checkpoint(done.checkpoint, device)
    current = None
    if config.compare_with:
        current = evaluate_model(config.model(config.compare_with), val, device)["patient_weighted"]
    test_metrics = evaluate_model(new, test, device) if len(test) else None
    yield CompareReport(evaluate_model(new, val, device)["patient_weighted"], current, test_metrics, new)
