"""The training tab: fine-tune the model on patch folders and annotated regions, with live curves."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from inference.annotations import AnnotationStore
from inference.atomic import write_bytes
from inference.model import LoadedModel, ModelError, load_checkpoint
from resources import shipped_model_path
from training.loop import FINE_TUNE, FINE_TUNE_VAL_FRACTION, DoneReport, EpochReport, StepReport
from training.regions import DEFAULT_LABELS, class_labels
from training.session import (
    CompareReport,
    DataReport,
    FolderSource,
    RegionSource,
    SessionConfig,
    run,
)
from viewer.session import SlideSession
from viewer.training_curves import TrainingCurves
from viewer.workers import JobRunner

log = logging.getLogger(__name__)

METRIC_KEYS = ("balanced_accuracy", "auc", "f1", "accuracy", "sensitivity", "specificity")


class TrainingTab(QWidget):
    """Sources, settings, live curves and the comparison of the new model with the current one."""

    model_accepted = Signal(object)  # LoadedModel the user chose to use

    def __init__(self, session: SlideSession) -> None:
        super().__init__()
        self.session = session
        #: Asks the user a yes/no question (a dialog; the main window answers "no" when not interactive).
        self.confirm: Callable[[str, str], bool] = lambda title, text: QMessageBox.question(
            self, title, text) == QMessageBox.StandardButton.Yes
        self.runner = JobRunner(self)
        self._counting = False  # the job running counts patches rather than training
        self.runner.report.connect(self._on_runner_report)
        self.runner.failed.connect(self._on_runner_failed)
        self.runner.finished.connect(self._on_runner_finished)
        self._workdir = Path(tempfile.mkdtemp(prefix="idc-train-"))
        self.result_path: Path | None = None
        self.result_model: LoadedModel | None = None
        self.compare: CompareReport | None = None
        self._build()
        self._update_controls()

    # -- layout -----------------------------------------------------------------------------
    def _build(self) -> None:
        outer = QHBoxLayout(self)
        split = QSplitter(Qt.Orientation.Horizontal)
        outer.addWidget(split)
        left = QWidget()
        lv = QVBoxLayout(left)
        split.addWidget(left)

        src = QGroupBox("Training data")
        sv = QVBoxLayout(src)
        self.folder_list = QListWidget()
        self.folder_list.setToolTip("Patch folders in the Kaggle layout: <root>/<patient>/<0|1>/*_classN.png")
        sv.addWidget(self.folder_list)
        row = QHBoxLayout()
        add = QPushButton("Add patch folder\u2026")
        add.clicked.connect(self._on_add_folder_clicked)
        rem = QPushButton("Remove")
        rem.clicked.connect(self._on_remove_folder_clicked)
        row.addWidget(add)
        row.addWidget(rem)
        sv.addLayout(row)
        self.use_regions = QCheckBox("IDC / Non-IDC regions of the open slide")
        self.use_regions.setChecked(True)
        sv.addWidget(self.use_regions)
        self.regions_label = QLabel("")
        self.regions_label.setWordWrap(True)
        sv.addWidget(self.regions_label)
        self.count_button = QPushButton("Count patches")
        self.count_button.clicked.connect(self.count)
        sv.addWidget(self.count_button)
        self.counts_table = QTableWidget(0, 4)
        self._name_counts()
        self.session.model_changed.connect(self._name_counts)
        self.counts_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.counts_table.verticalHeader().setVisible(False)
        self.counts_table.setMinimumHeight(150)
        sv.addWidget(self.counts_table)
        lv.addWidget(src)

        settings = QGroupBox("Settings")
        form = QFormLayout(settings)
        self.start_model = QComboBox()
        self.start_model.addItem("Current model", None)
        self.start_model.addItem("Choose a checkpoint\u2026", "browse")
        self.start_model.activated.connect(self._on_start_model_activated)
        form.addRow("Start from", self.start_model)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 200)
        self.epochs.setValue(FINE_TUNE.epochs)
        form.addRow("Epochs", self.epochs)
        self.samples = QSpinBox()
        self.samples.setRange(64, 1_000_000)
        self.samples.setSingleStep(256)
        self.samples.setValue(FINE_TUNE.samples_per_epoch)
        form.addRow("Patches per epoch", self.samples)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(1e-5, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(FINE_TUNE.lr)
        form.addRow("Learning rate", self.lr)
        self.batch = QSpinBox()
        self.batch.setRange(8, 1024)
        self.batch.setValue(FINE_TUNE.batch_size)
        form.addRow("Batch size", self.batch)
        self.freeze = QCheckBox("Freeze the trunk (train the head only: faster, adapts less)")
        self.freeze.setChecked(False)
        form.addRow(self.freeze)
        self.augment = QCheckBox("Augmentation (flips, rotations, stain jitter)")
        self.augment.setChecked(True)
        form.addRow(self.augment)
        self.split_by = QComboBox()
        self.split_by.addItems(["automatic", "patient or slide", "region (one slide)"])
        self.split_by.setToolTip("Automatic: by region when the open slide's regions are the only data "
                                 "(one slide cannot be split by slide), else by patient or slide")
        form.addRow("Validation split by", self.split_by)
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setRange(0.05, 0.5)
        self.val_fraction.setSingleStep(0.05)
        self.val_fraction.setValue(FINE_TUNE_VAL_FRACTION)
        form.addRow("Validation share", self.val_fraction)
        self.seed = QSpinBox()
        self.seed.setRange(0, 1_000_000)
        form.addRow("Seed", self.seed)
        lv.addWidget(settings)

        row = QHBoxLayout()
        self.start_button = QPushButton("Start training")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.start_button)
        row.addWidget(self.cancel_button)
        lv.addLayout(row)
        self.progress = QProgressBar()
        lv.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lv.addWidget(self.status)
        lv.addStretch(1)

        right = QWidget()
        rv = QVBoxLayout(right)
        split.addWidget(right)
        split.setStretchFactor(1, 2)
        self.curves = TrainingCurves()
        rv.addWidget(self.curves)
        self.compare_table = QTableWidget(len(METRIC_KEYS), 2)
        self.compare_table.setHorizontalHeaderLabels(["New model", "Current model"])
        self.compare_table.setVerticalHeaderLabels([k.replace("_", " ") for k in METRIC_KEYS])
        self.compare_table.setMinimumHeight(200)
        rv.addWidget(QLabel("On the same validation data (patient/slide-weighted):"))
        rv.addWidget(self.compare_table)
        row = QHBoxLayout()
        self.use_button = QPushButton("Use this model")
        self.use_button.clicked.connect(self.use_model)
        self.save_button = QPushButton("Save checkpoint\u2026")
        self.save_button.clicked.connect(self._on_save_clicked)
        row.addWidget(self.use_button)
        row.addWidget(self.save_button)
        rv.addLayout(row)

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 (Qt override)
        self.update_region_counts()
        super().showEvent(event)

    def update_region_counts(self) -> None:
        """Say which of the open slide's regions are ground truth, per source."""
        truth, model_only = region_counts(self.session.store, self._labels())
        text = f"{truth} region{'' if truth == 1 else 's'} drawn or confirmed by a person"
        if model_only:
            text += (f"; {model_only} model region{'' if model_only == 1 else 's'} not used as truth "
                     "(confirm or edit them in the Annotations panel to train on them)")
        self.regions_label.setText(text + ".")

    def _update_controls(self) -> None:
        running = self.runner.running()
        self.start_button.setEnabled(not running)
        self.count_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        has_result = self.result_path is not None and self.result_path.exists()
        self.use_button.setEnabled(has_result and not running)
        self.save_button.setEnabled(has_result and not running)

    # -- sources ----------------------------------------------------------------------------
    def add_folder(self, path: str) -> None:
        self.folder_list.addItem(path)

    @Slot()
    def _on_add_folder_clicked(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Patch folder (Kaggle layout)")
        if path:
            self.add_folder(path)

    @Slot()
    def _on_remove_folder_clicked(self) -> None:
        for item in self.folder_list.selectedItems():
            self.folder_list.takeItem(self.folder_list.row(item))

    @Slot(int)
    def _on_start_model_activated(self, index: int) -> None:
        if self.start_model.itemData(index) != "browse":
            return
        path, _ = QFileDialog.getOpenFileName(self, "Start from checkpoint", "", "Checkpoints (*.pt)")
        if path:
            self.start_model.insertItem(index, Path(path).name, path)
            self.start_model.setCurrentIndex(index)
        else:
            self.start_model.setCurrentIndex(0)

    def _name_counts(self, *_: object) -> None:
        """The counts' columns are the model's two classes (IDC / Non-IDC, Metastasis / Normal)."""
        model = self.session.model
        negative, positive = model.meta.classes if model is not None else ("Non-IDC", "IDC")
        self.counts_table.setHorizontalHeaderLabels(["Source / split", positive, negative, "Patients/slides"])

    def _start_path(self) -> str:
        data = self.start_model.currentData()
        if data:
            return str(data)
        model = self.session.model
        path = model.path if model is not None else None
        return str(path or shipped_model_path())

    def region_source(self) -> RegionSource | None:
        """The open slide's IDC / Non-IDC regions a person drew or confirmed, as a source."""
        slide = self.session.slide
        return regions_source(slide.path, self.session.store, slide.mpp, self._labels()) if slide is not None else None

    def _labels(self) -> dict[str, int]:
        """The region classes that teach the model in use (IDC / Non-IDC, Metastasis / Normal)."""
        return class_labels(self.session.model.meta if self.session.model is not None else None)

    def sources(self) -> tuple[FolderSource | RegionSource, ...]:
        out: list[FolderSource | RegionSource] = [
            FolderSource(self.folder_list.item(i).text()) for i in range(self.folder_list.count())
        ]
        if self.use_regions.isChecked():
            regions = self.region_source()
            if regions is not None and regions.annotations:
                mode = self.split_by.currentIndex()
                by_region = mode == 2 or (mode == 0 and not out)
                group_by = "region" if by_region else "slide"
                out.append(RegionSource(regions.slide_path, regions.annotations, regions.mpp, group_by))
        return tuple(out)

    def config(self) -> SessionConfig:
        start = self._start_path()
        current = self.session.model
        # The model in use is passed as it is, not read from disk again (a run read it 7 times).
        in_use = current is not None and current.path is not None and str(current.path) == start
        start_model = current if in_use else load_checkpoint(start)
        assert start_model is not None
        meta = start_model.meta
        train = replace(
            FINE_TUNE,
            out=self.config_out(),
            arch=meta.arch,
            epochs=self.epochs.value(),
            samples_per_epoch=self.samples.value(),
            batch_size=self.batch.value(),
            lr=self.lr.value(),
            patience=max(2, self.epochs.value()),
            seed=self.seed.value(),
            init=start,
            freeze_trunk=self.freeze.isChecked(),
            augment=self.augment.isChecked(),
            mpp=meta.mpp,
        )
        return SessionConfig(self.sources(), train, self.val_fraction.value(), 0.0, compare_with=start,
                             loaded=(start_model,))

    @Slot()
    def count(self) -> None:
        """Count patches per source and show the split a run would use, as a background job."""
        from training.session import count

        if self.runner.running():
            return
        self.update_region_counts()
        try:
            config = self.config()
        except (ModelError, OSError) as exc:
            self.status.setText(f"Cannot count: {exc}")
            return
        self._counting = True
        self.status.setText("Counting patches\u2026")
        self.runner.start(lambda: count(config))
        self._update_controls()

    def _fill_counts(self, by_source: dict[str, dict[str, int]], splits: dict[str, dict[str, int]]) -> None:
        rows = list(by_source.items()) + [(f"split: {k}", v) for k, v in splits.items() if v["patches"]]
        self.counts_table.setRowCount(len(rows))
        for r, (name, c) in enumerate(rows):
            for col, text in enumerate([name, str(c["idc"]), str(c["non_idc"]), str(c["groups"])]):
                self.counts_table.setItem(r, col, QTableWidgetItem(text))

    # -- running ----------------------------------------------------------------------------
    @Slot()
    def start(self) -> None:
        if self.runner.running():
            return
        try:
            config = self.config()
        except (ModelError, OSError) as exc:
            self.status.setText(f"Cannot start: {exc}")
            return
        if not config.sources:
            self.status.setText("Add a patch folder or draw IDC / Non-IDC regions on the open slide first.")
            return
        # A cancelled run offers only what it trained: forget the previous run's checkpoint.
        out = Path(config.train.out)
        for stale in (out, out.with_name(out.name + ".resume.pt")):
            stale.unlink(missing_ok=True)
        self._reset_curves()
        self.result_path, self.result_model, self.compare = None, None, None
        self.status.setText("Loading patches\u2026")
        self.runner.start(lambda: run(config))
        self._update_controls()

    @Slot()
    def cancel(self) -> None:
        """Stop within one batch; the best checkpoint so far stays usable."""
        if self.runner.running():
            self.runner.stop()
            out = Path(self.config_out())
            if out.exists():
                self.result_path = out
                self.result_model = load_checkpoint(out)
                self.status.setText("Cancelled; the best model so far can be used or saved.")
            else:
                self.status.setText("Cancelled before the first epoch finished; nothing to keep.")
            self._update_controls()

    def config_out(self) -> str:
        return str(self._workdir / "fine_tuned.pt")

    def stop(self) -> None:
        self.runner.stop()

    def shutdown(self) -> None:
        """Stop and wait for every thread of this panel, then remove its working folder (closing
        the window); a checkpoint the user wants to keep was saved elsewhere with *Save*."""
        self.runner.shutdown()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def _reset_curves(self) -> None:
        self.curves.reset()
        self.compare_table.clearContents()
        self.progress.setValue(0)

    @Slot(object)
    def _on_runner_report(self, report: object) -> None:
        if isinstance(report, DataReport):
            self._fill_counts(report.by_source, report.counts)
            self.status.setText(f"Training on {report.counts['train']['patches']} patches, validating on "
                                f"{report.counts['val']['patches']} ({len(report.val_groups)} groups).")
        elif isinstance(report, StepReport):
            self.curves.add_step(report)
            total = report.steps * self.epochs.value()
            self.progress.setRange(0, total)
            self.progress.setValue(report.epoch * report.steps + report.step + 1)
        elif isinstance(report, EpochReport):
            self.curves.add_epoch(report)
            self.status.setText(f"Epoch {report.epoch}/{report.epochs}; ETA {report.eta_s:.0f} s.")
        elif isinstance(report, DoneReport):
            self.result_path = Path(report.checkpoint)
        elif isinstance(report, CompareReport):
            self.compare = report
            self.result_model = report.model
            for r, key in enumerate(METRIC_KEYS):
                self.compare_table.setItem(r, 0, QTableWidgetItem(f"{report.new[key]:.3f}"))
                cur = "\u2014" if report.current is None else f"{report.current[key]:.3f}"
                self.compare_table.setItem(r, 1, QTableWidgetItem(cur))

    @Slot(str)
    def _on_runner_failed(self, message: str) -> None:
        self.status.setText(f"{'Cannot count' if self._counting else 'Training stopped'}: {message}")

    @Slot(bool)
    def _on_runner_finished(self, completed: bool) -> None:
        if self._counting:
            self._counting = False
            if completed:
                self.status.setText("Counted; the table shows the split a run would use.")
        elif completed and self.result_model is not None:
            worse = self.new_is_worse()
            self.status.setText(
                f"Done, but the new model is worse than the current one on the same validation data "
                f"(balanced accuracy {worse[0]:.3f} against {worse[1]:.3f}); keep the current one unless "
                "you have a reason." if worse else "Done. Compare the models below, then use or save the new one.")
        self._update_controls()

    def new_is_worse(self) -> tuple[float, float] | None:
        """(new, current) balanced accuracy when the new model is worse on the same validation data."""
        c = self.compare
        if c is None or c.current is None:
            return None
        new, cur = c.new["balanced_accuracy"], c.current["balanced_accuracy"]
        return (new, cur) if new < cur else None

    # -- results ----------------------------------------------------------------------------
    @Slot()
    def use_model(self) -> None:
        if self.result_path is None:
            return
        worse = self.new_is_worse()
        if worse and not self.confirm(
                "Use a worse model?",
                f"On the same validation data the new model's balanced accuracy is {worse[0]:.3f}, the "
                f"current model's {worse[1]:.3f}. Use the new model anyway?"):
            self.status.setText("Kept the current model.")
            return
        model = self.result_model or load_checkpoint(self.result_path)
        self.model_accepted.emit(model)
        self.status.setText(f"Using {model.model_id}; the heatmap of the open slide is being recomputed.")

    @Slot()
    def _on_save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save checkpoint", "idc_finetuned.pt", "Checkpoints (*.pt)")
        if path:
            self.save_checkpoint(Path(path))

    def save_checkpoint(self, path: Path) -> Path:
        """Copy the new checkpoint (with its provenance) atomically."""
        assert self.result_path is not None
        write_bytes(path, self.result_path.read_bytes())
        self.status.setText(f"Saved {path}.")
        return path


def regions_source(slide_path: Path | None, store: AnnotationStore | None, mpp: float | None,
                   labels: dict[str, int] = DEFAULT_LABELS) -> RegionSource | None:
    """The open slide's regions of the model's two classes as a training source."""
    if slide_path is None or store is None:
        return None
    anns = store.truth(labels)
    return RegionSource(str(slide_path), anns, mpp) if anns else None


def region_counts(store: AnnotationStore | None, labels: dict[str, int] = DEFAULT_LABELS) -> tuple[int, int]:
    """(regions of the two classes a person drew or confirmed, model regions not used as truth)."""
    if store is None:
        return 0, 0
    labelled = [a for a in store.items if a.cls in labels]
    truth = store.truth(labels)
    return len(truth), len(labelled) - len(truth)
