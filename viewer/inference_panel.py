"""The heatmap panel: picks the model, runs whole-slide inference on a QThread and shows the map as
it fills in; each slide keeps one heatmap per model while it is open."""

from __future__ import annotations

import logging

import numpy as np
from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from inference.domain import warnings as domain_warnings
from inference.heatmap import COLORMAPS, Heatmap, HeatmapInfo
from inference.model import LoadedModel, pick_device
from inference.patches import GridError
from inference.predict import BatchResult, PredictSettings, heatmap_info
from inference.session import Finished, Planned, cached_heatmap, infer
from inference.truth import (
    DISAGREEMENT_CLASSES,
    Truth,
    TruthError,
    agreement,
    away_from_borders,
    cell_truth,
    disagreements,
    labels_path,
    load_truth,
)
from viewer.heatmap_legend import LegendBar, describe_agreement, describe_call, describe_model
from viewer.layers import HeatmapLayer, OutlineLayer
from viewer.model_picker import ModelLibrary, ModelPicker
from viewer.session import SlideSession
from viewer.slide_view import SlideView
from viewer.workers import JobRunner

log = logging.getLogger(__name__)


class InferencePanel(QWidget):
    """Pick the model, and run, cancel and style its heatmap of the session's slide.

    Jobs are :func:`inference.session.infer` generators on the panel's :class:`JobRunner`; the
    heatmap a job fills is the one shown and the one the session publishes.
    """

    mpp_needed = Signal()
    heatmap_finished = Signal(object)  # Heatmap, when a job completes
    status_message = Signal(str)

    def __init__(self, session: SlideSession, view: SlideView, settings: PredictSettings | None = None,
                 library: ModelLibrary | None = None) -> None:
        super().__init__()
        self.session = session
        self.library = library or ModelLibrary(session)
        #: The open slide's heatmaps by model (finished or part-way), so that switching back is instant.
        self._maps: dict[str, Heatmap] = {}
        self.view = view
        self.settings = settings or PredictSettings()
        self.heatmap: Heatmap | None = None
        self.layer: HeatmapLayer | None = None
        self.truth: OutlineLayer | None = None
        self.disagreement_layers: list[OutlineLayer] = []  # false IDC, missed IDC
        self.ground_truth: Truth | None = None
        # the heatmap they were found for, the cell labels, ambiguous cells, labels away from borders
        self._cell_labels: tuple[HeatmapInfo, np.ndarray, int, np.ndarray] | None = None
        self._out_of_domain = False  # of the slide shown, from the domain warnings
        self.runner = JobRunner(self)
        self.runner.report.connect(self._on_runner_report)
        self.runner.failed.connect(self._on_runner_failed)
        self.runner.finished.connect(self._on_runner_finished)
        session.slide_closing.connect(self._on_session_slide_closing)
        session.slide_changed.connect(self._on_session_slide_changed)
        session.resolution_changed.connect(self._on_session_resolution_changed)
        session.model_changed.connect(self._on_session_model_changed)
        self._build()
        self._update_controls()

    @property
    def model(self) -> LoadedModel | None:
        """The session's model (the panel has no model of its own)."""
        return self.session.model

    # -- widgets ----------------------------------------------------------------------------
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        self.picker = ModelPicker(self.library)
        self.picker.error.connect(self.status_message)
        layout.addWidget(self.picker)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        layout.addWidget(self.model_label)
        row = QHBoxLayout()
        self.run_button = QPushButton("Run IDC heatmap")
        self.run_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m patches")
        layout.addWidget(self.progress)
        self.rate_label = QLabel("")
        layout.addWidget(self.rate_label)
        self.call_label = QLabel("")  # the slide's answer (inference.calls)
        self.call_label.setWordWrap(True)
        layout.addWidget(self.call_label)

        form = QFormLayout()
        self.show_box = QCheckBox("Show heatmap (H)")
        self.show_box.setChecked(True)
        self.show_box.toggled.connect(self._on_show_toggled)
        form.addRow(self.show_box)
        self.context_box = QCheckBox("Tissue context (each cell weighed with its neighbours)")
        self.context_box.setToolTip("On: the model's context-aware map, the default. Off: the raw "
                                    "per-patch map. Hover, regions and measurements use the map shown.")
        self.context_box.setChecked(True)
        self.context_box.toggled.connect(self._on_context_toggled)
        form.addRow(self.context_box)
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(60)
        self.opacity.valueChanged.connect(self._on_style_changed)
        form.addRow("Opacity", self.opacity)
        self.colormap = QComboBox()
        self.colormap.addItems(list(COLORMAPS))
        self.colormap.currentTextChanged.connect(self._on_style_changed)
        form.addRow("Colour map", self.colormap)
        self.legend = LegendBar()
        form.addRow(self.legend)
        self.threshold = QSlider(Qt.Orientation.Horizontal)
        self.threshold.setRange(0, 100)
        self.threshold.setValue(50)  # follows the model's threshold once a heatmap is shown
        self._followed: int | None = None  # the value the slider was last set to by the model
        self.threshold.setToolTip("Cells at or above this IDC probability are shown. It starts at the model's "
                                  "threshold for this slide and map, which regions and agreement use too.")
        self.threshold.valueChanged.connect(self._on_style_changed)
        self.threshold_label = QLabel("0.00")
        trow = QHBoxLayout()
        trow.addWidget(self.threshold)
        trow.addWidget(self.threshold_label)
        form.addRow("Show P \u2265", trow)
        self.tissue_box = QCheckBox("Show tissue mask (cells to compute)")
        self.tissue_box.toggled.connect(self._on_style_changed)
        form.addRow(self.tissue_box)
        self.truth_box = QCheckBox("Show ground truth outline (IDC)")
        self.truth_box.toggled.connect(self._on_truth_toggled)
        form.addRow(self.truth_box)
        self.disagree_box = QCheckBox("Show disagreements (orange: called IDC, purple: IDC missed)")
        self.disagree_box.setToolTip("Orange: cells the map shown calls IDC that the truth labels non-IDC. Purple: "
                                     "IDC the map misses. At the model's threshold, as the agreement counts them. "
                                     "While the heatmap fills they cover the cells computed so far, and they are "
                                     "drawn again when it is complete.")
        self.disagree_box.toggled.connect(self._update_disagreements)
        form.addRow(self.disagree_box)
        layout.addLayout(form)
        self.agreement_label = QLabel("")
        self.agreement_label.setWordWrap(True)
        layout.addWidget(self.agreement_label)
        self.domain_label = QLabel("")
        self.domain_label.setWordWrap(True)
        self.domain_label.setStyleSheet("QLabel { color: #a00000; font-weight: bold; }")
        layout.addWidget(self.domain_label)
        layout.addStretch(1)
        self._on_style_changed()  # the threshold label shows the slider's value from the start

    def _update_controls(self) -> None:
        running = self.runner.running()
        has_model = self.model is not None
        self.run_button.setEnabled(has_model and self.session.slide is not None and not running
                                   and not (self.heatmap is not None and self.heatmap.complete))
        self.cancel_button.setEnabled(running)
        self.truth_box.setEnabled(self.ground_truth is not None)
        self.disagree_box.setEnabled(self.ground_truth is not None and self.heatmap is not None)
        self.context_box.setEnabled(self.heatmap is not None and self.heatmap.has_context)
        if self.model is None:
            self.model_label.setText("No model loaded: choose one above to compute a heatmap.")
            self.run_button.setText("Run heatmap")
        else:
            positive = self.model.meta.positive_class
            self.model_label.setText(describe_model(self.model))
            self.legend.positive = positive
            self.run_button.setText(f"Run {positive} heatmap")
            self.truth_box.setText(f"Show ground truth outline ({positive})")
            self.disagree_box.setText(f"Show disagreements (orange: called {positive}, purple: {positive} missed)")

    # -- session ----------------------------------------------------------------------------
    @Slot()
    def _on_session_slide_closing(self) -> None:
        self.stop()
        self._remove_layers()
        self.ground_truth, self._cell_labels, self._maps = None, None, {}

    @Slot(object)
    def _on_session_slide_changed(self, slide: object) -> None:
        """Show the new slide's ground truth and cached heatmap, if any."""
        self.progress.reset()
        self.rate_label.setText("")
        self.agreement_label.setText("")
        if slide is not None:
            lp = labels_path(self.session.slide.path)
            if lp.exists():
                try:
                    self.ground_truth = load_truth(lp)
                except TruthError as exc:
                    log.warning("ignoring ground truth: %s", exc)
            self._load_cached()
        if self.truth_box.isChecked():
            self._on_truth_toggled(True)
        self._update_domain()
        self._update_controls()

    @Slot(object)
    def _on_session_resolution_changed(self, _slide: object) -> None:
        """A new resolution is a new grid: stop, and show the cached heatmap of that grid if any."""
        self.stop()
        self._remove_heatmap()
        self._load_cached()
        self._update_domain()
        self._update_controls()

    @Slot(object)
    def _on_session_model_changed(self, _model: object) -> None:
        """Another model: its heatmap of the open slide replaces this one (cached or recomputed)."""
        was_shown = self.heatmap is not None or self.runner.running()
        self.stop()
        if self.heatmap is not None:
            self._maps[self.heatmap.info.key()] = self.heatmap
        self._remove_heatmap()
        self._load_cached(self._maps.get(self._map_key()))  # this slide's map by that model, if kept
        self._update_domain()
        if was_shown:
            self.start()
        self._update_controls()

    def _map_key(self) -> str | None:
        """The key of the heatmap the session's slide and model would have (None: no grid yet)."""
        slide, model = self.session.slide, self.session.model
        if slide is None or model is None or slide.mpp is None:
            return None
        try:
            return heatmap_info(slide, model, self.settings).key()
        except GridError:
            return None

    def _load_cached(self, kept: Heatmap | None = None) -> bool:
        """Show ``kept`` (a map this panel holds), else the slide and model's cached one, if any."""
        slide, model = self.session.slide, self.session.model
        if kept is None and (slide is None or model is None or slide.mpp is None):
            return False
        try:
            hm = kept or cached_heatmap(slide, model, self.settings)  # type: ignore[arg-type]
        except GridError:
            return False
        if hm is None:
            return False
        self._show_heatmap(hm)
        self._show_progress(hm)
        self.rate_label.setText("" if kept is not None and hm.complete else "Loaded from cache." if hm.complete else
                                "Partly computed earlier; Run resumes where it stopped.")
        self._update_agreement()
        self._update_domain()
        return True

    def _show_progress(self, hm: Heatmap) -> None:
        self.progress.setRange(0, int(hm.tissue.sum()))
        self.progress.setValue(int((hm.patch_done & hm.tissue).sum()))

    # -- running ----------------------------------------------------------------------------
    @Slot()
    def start(self) -> None:
        """Start (or resume) inference on the open slide."""
        slide, model = self.session.slide, self.session.model
        if slide is None or model is None or self.runner.running():
            return
        if slide.mpp is None:
            self.status_message.emit("Enter the slide's resolution (MPP) before running the model.")
            self.mpp_needed.emit()
            return
        if self.heatmap is not None and self.heatmap.complete:
            return
        resume, settings, device = self.heatmap, self.settings, self.session.device
        self.runner.start(lambda: infer(slide, model, pick_device(device), settings, resume=resume))
        self.rate_label.setText("Finding tissue\u2026" if resume is None else "Resuming\u2026")
        self._update_controls()

    @Slot()
    def cancel(self) -> None:
        if self.runner.running():
            self.stop()
            self.rate_label.setText("Cancelled; cells already computed stay on the slide.")
            self._update_controls()

    def stop(self) -> None:
        """Stop the running job at once; its late reports are dropped (it winds down within one batch)."""
        self.runner.stop()

    def shutdown(self) -> None:
        """Stop and wait for every thread of this panel (closing the window)."""
        self.runner.shutdown()

    def toggle_visible(self) -> None:
        """H: show/hide; the first time on a slide, start computing."""
        if self.heatmap is None and not self.runner.running():
            self.show_box.setChecked(True)
            self.start()
        else:
            self.show_box.setChecked(not self.show_box.isChecked())

    @Slot(object)
    def _on_runner_report(self, report: object) -> None:
        if isinstance(report, Planned):
            if report.heatmap is not self.heatmap:
                self._show_heatmap(report.heatmap)
            self._show_progress(report.heatmap)
            self.rate_label.setText("Computing\u2026")
        elif isinstance(report, BatchResult) and self.layer is not None:
            self.layer.refresh(report.block)
            self.progress.setValue(report.done)
            eta = "" if report.eta_s == float("inf") else f", ETA {report.eta_s:.0f} s"
            self.rate_label.setText(f"{report.patches_per_s:.0f} patches/s{eta}")
        elif isinstance(report, Finished) and self.heatmap is not None:
            # An adaptive threshold is set again from all the slide's cells. Not on every batch:
            # each move redraws the whole view, which the event loop felt while inference ran.
            self._follow_threshold()
            self._show_progress(self.heatmap)
            self.rate_label.setText(f"Done: {int(self.heatmap.tissue.sum())} tissue patches.")
            self._update_agreement()
            self._update_domain()
            self.session.set_heatmap(self.heatmap)  # finished: measurements and regions follow

    @Slot(str)
    def _on_runner_failed(self, message: str) -> None:
        self.rate_label.setText(f"Inference failed: {message}")
        self.status_message.emit(f"Inference failed: {message}")

    @Slot(bool)
    def _on_runner_finished(self, completed: bool) -> None:
        self._update_controls()
        if completed and self.heatmap is not None and self.heatmap.complete:
            self.heatmap_finished.emit(self.heatmap)  # once the job's thread is gone

    # -- display ----------------------------------------------------------------------------
    def _show_heatmap(self, heatmap: Heatmap) -> None:
        self._remove_heatmap()
        self.heatmap = heatmap
        heatmap.context = self.context_box.isChecked()
        self.layer = HeatmapLayer(heatmap)
        self.view.scene().addItem(self.layer)
        self._follow_threshold(force=True)
        self._on_style_changed()
        self.layer.setVisible(self.show_box.isChecked())
        self.session.set_heatmap(heatmap)
        self._update_call()
        self._update_controls()

    def _remove_heatmap(self) -> None:
        if self.layer is not None:
            self.view.scene().removeItem(self.layer)
        if self.heatmap is not None:
            self.session.set_heatmap(None)
        self.layer, self.heatmap = None, None
        self._update_disagreements()

    def _remove_layers(self) -> None:
        self._remove_heatmap()
        if self.truth is not None:
            self.view.scene().removeItem(self.truth)
            self.truth = None

    def _follow_threshold(self, force: bool = False) -> None:
        """Show only cells at or above the model's threshold for the map shown on this slide (the
        default); once the user has moved the slider it stays where they put it, unless ``force``."""
        if self.heatmap is None or not (force or self.threshold.value() == self._followed):
            return
        self._followed = round(min(self.heatmap.call_threshold, 1.0) * 100)
        self.threshold.setValue(self._followed)

    @Slot()
    def _on_style_changed(self, *_: object) -> None:
        thr = self.threshold.value() / 100
        self.threshold_label.setText(f"{thr:.2f}")
        self.legend.colormap = self.colormap.currentText()
        self.legend.update()
        if self.layer is not None:
            self.layer.colormap = self.colormap.currentText()
            self.layer.threshold = thr
            self.layer.show_tissue = self.tissue_box.isChecked()
            self.layer.setOpacity(self.opacity.value() / 100)
            self.layer.refresh()

    @Slot(bool)
    def _on_context_toggled(self, on: bool) -> None:
        if self.heatmap is None:
            return
        self.heatmap.context = on
        self._follow_threshold(force=True)
        if self.layer is not None:
            self.layer.refresh()
        self._update_agreement()
        self.session.set_heatmap(self.heatmap)  # regions and measurements follow the map shown

    @Slot(bool)
    def _on_show_toggled(self, on: bool) -> None:
        if self.layer is not None:
            self.layer.setVisible(on)

    @Slot(bool)
    def _on_truth_toggled(self, on: bool) -> None:
        if on and self.truth is None and self.ground_truth is not None:
            self.truth = OutlineLayer(self.ground_truth.idc_outlines, QColor(0, 200, 255))
            self.view.scene().addItem(self.truth)
        if self.truth is not None:
            self.truth.setVisible(on)

    def _update_domain(self) -> None:
        """Say when the slide lies outside what the model was trained on (resolution, appearance)."""
        slide, model = self.session.slide, self.session.model
        if slide is None or model is None:
            self.domain_label.setText("")
            return
        score = self.heatmap.domain_score(model.meta.domain) if self.heatmap is not None else None
        texts = domain_warnings(slide.mpp, model.meta, score)
        self._out_of_domain = bool(texts)
        self.domain_label.setText("\n".join(f"\u26a0 {t}" for t in texts))
        if texts:
            self.status_message.emit(texts[0])
        self._update_call()

    def _update_call(self) -> None:
        """The slide's answer: its call and calibrated score, once every tissue cell is computed."""
        hm, model = self.heatmap, self.model
        if hm is None or model is None or hm.info.slide_call is None:
            self.call_label.setText("")
            return
        text, colour = describe_call(hm, model.meta.positive_class, self._out_of_domain)
        self.call_label.setStyleSheet(f"QLabel {{ color: {colour}; font-weight: bold; }}" if colour else "")
        self.call_label.setText(text)

    def _truth_labels(self) -> tuple[HeatmapInfo, np.ndarray, int, np.ndarray] | None:
        """The shown heatmap's cell labels from the ground truth (found once per heatmap)."""
        if self.heatmap is None or self.ground_truth is None:
            return None
        if self._cell_labels is None or self._cell_labels[0] != self.heatmap.info:
            labels, ambiguous = cell_truth(self.heatmap.grid, self.ground_truth)
            self._cell_labels = (self.heatmap.info, labels, ambiguous, away_from_borders(labels))
        return self._cell_labels

    def _update_agreement(self) -> None:
        labelled = self._truth_labels()
        if labelled is None:
            return
        _, labels, ambiguous, inner_labels = labelled
        a = agreement(self.heatmap, labels, ambiguous)
        if a is not None and 0 < a.idc_cells < a.cells:
            inner = agreement(self.heatmap, inner_labels, ambiguous)
            self.agreement_label.setText(describe_agreement(a, inner, self.heatmap.info.positive))
        self._update_disagreements()

    def _update_disagreements(self, *_: object) -> None:
        """Outline the cells where the map shown disagrees with the ground truth (when asked)."""
        for layer in self.disagreement_layers:
            self.view.scene().removeItem(layer)
        self.disagreement_layers = []
        labelled = self._truth_labels() if self.disagree_box.isChecked() else None
        if labelled is None:
            return
        regions = disagreements(self.heatmap, labelled[1])
        for cls in DISAGREEMENT_CLASSES:
            geoms = [r.geometry for r in regions if r.cls == cls.name]
            if geoms:
                layer = OutlineLayer(geoms, QColor(*cls.color))
                self.view.scene().addItem(layer)
                self.disagreement_layers.append(layer)

    def probability_at(self, x_l0: float, y_l0: float) -> float | None:
        """IDC probability of the cell under a level-0 point, if computed."""
        if self.heatmap is None:
            return None
        cell = self.heatmap.grid.cell_at(x_l0, y_l0)
        if cell is None:
            return None
        p = self.heatmap.prob[cell]
        return float(p) if np.isfinite(p) else None
