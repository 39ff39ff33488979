"""The main window: menus, docks and status bar around the slide view."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PySide6.QtCore import QSettings, Qt, Signal, Slot
from PySide6.QtGui import (
    QAction,
    QActionGroup,
    QCloseEvent,
    QDragEnterEvent,
    QDropEvent,
    QKeySequence,
)
from PySide6.QtWidgets import (
    QDockWidget,
    QFileDialog,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QTabWidget,
    QWidget,
)

from inference.geometry import Rect
from inference.model import LoadedModel
from inference.slide import SLIDE_SUFFIXES, Slide, SlideError, open_slide
from inference.tiles import TileKey
from resources import demo_slide_path, resource_path
from viewer.annotation_controller import AnnotationController
from viewer.annotation_panel import AnnotationPanel
from viewer.inference_panel import InferencePanel
from viewer.layers import qimage_to_array
from viewer.model_picker import ModelLibrary
from viewer.panels import AdjustDialog, MetadataPanel, OverviewPanel, ShortcutsDialog
from viewer.session import SlideSession
from viewer.slide_view import PRESETS, SlideView
from viewer.tools import TOOLS
from viewer.training_tab import TrainingTab
from viewer.worklist_tab import WorklistTab

log = logging.getLogger(__name__)

SLIDE_FILTER = f"Slides and images ({' '.join('*' + s for s in SLIDE_SUFFIXES)});;All files (*)"
MAX_RECENT = 10


class MainWindow(QMainWindow):
    """Assembles the session, the view and the panels, and builds the menus.

    The open slide's state lives in :attr:`session`; every panel receives it and subscribes.
    """

    error_shown = Signal(str)

    def __init__(self, settings: QSettings | None = None, interactive: bool = True,
                 model: LoadedModel | None = None, device: str = "auto") -> None:
        super().__init__()
        self.setWindowTitle("IDC Slide Viewer")
        self.settings = settings or QSettings("IDC Slide Viewer", "idc-viewer")
        self.interactive = interactive
        self.session = SlideSession(model, device, self)
        self.models = ModelLibrary(self.session)
        self.view = SlideView(self)
        self.training = TrainingTab(self.session)
        if not interactive:
            self.training.confirm = lambda title, text: False  # no dialogs: never adopt a worse model
        self.tabs = QTabWidget()
        self.tabs.addTab(self.view, "Slide")
        self.tabs.addTab(self.training, "Training")
        self.worklist = WorklistTab(self.session, self.models)
        self.tabs.addTab(self.worklist, "Worklist")
        self.worklist.open_requested.connect(self._on_worklist_open_requested)
        self.setCentralWidget(self.tabs)
        self.setAcceptDrops(True)

        self.overview = OverviewPanel()
        self.metadata = MetadataPanel()
        self.inference = InferencePanel(self.session, self.view, library=self.models)
        if not interactive:
            self.inference.picker.confirm = lambda title, text: False  # no dialogs: run no code unasked
        self.annotation_panel = AnnotationPanel()
        self.annotations = AnnotationController(self.session, self.view, self.annotation_panel, self)
        self._dock(self.overview, "Overview", "overview")
        self._dock(self.inference, "Heatmap", "inference")
        self._dock(self.annotation_panel, "Annotations", "annotations")
        self._dock(self.metadata, "Slide", "metadata")
        self.tabifyDockWidget(self.findChild(QDockWidget, "inference"), self.findChild(QDockWidget, "annotations"))
        self.tabifyDockWidget(self.findChild(QDockWidget, "annotations"), self.findChild(QDockWidget, "metadata"))
        self.findChild(QDockWidget, "inference").raise_()
        self.session.slide_closing.connect(self._on_session_slide_closing)
        self.session.slide_changed.connect(self._on_session_slide_changed)
        self.session.resolution_changed.connect(self._on_session_resolution_changed)
        self.training.model_accepted.connect(self._on_training_model_accepted)
        self.annotations.error.connect(self.show_error)
        self.annotations.message.connect(self._on_inference_status_message)
        self.inference.mpp_needed.connect(self._on_inference_mpp_needed)
        self.inference.status_message.connect(self._on_inference_status_message)

        self.pos_label = QLabel("")
        self.zoom_label = QLabel("")
        self.statusBar().addWidget(self.pos_label, 1)
        self.statusBar().addPermanentWidget(self.zoom_label)

        self.view.viewport_changed.connect(self._on_view_viewport_changed)
        self.view.cursor_moved.connect(self._on_view_cursor_moved)
        self.view.tile_failed.connect(self._on_view_tile_failed)
        self.overview.navigate_requested.connect(self._on_overview_navigate_requested)
        self._build_menus()
        self._tile_error_shown = False
        self._adjust_dialog: AdjustDialog | None = None

    def _dock(self, widget: QWidget, title: str, name: str) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
        return dock

    # -- menus ------------------------------------------------------------------------------
    def _action(self, menu, text: str, slot, shortcut: str | QKeySequence | None = None) -> QAction:  # noqa: ANN001
        act = QAction(text, self)
        if shortcut is not None:
            act.setShortcut(QKeySequence(shortcut))
        act.triggered.connect(slot)
        menu.addAction(act)
        return act

    def _build_menus(self) -> None:
        mb = self.menuBar()
        f = mb.addMenu("&File")
        self._action(f, "&Open slide\u2026", self._on_open_triggered, QKeySequence.StandardKey.Open)
        self._action(f, "Open &folder (worklist)\u2026", self._on_open_folder_triggered, "Ctrl+Shift+O")
        self._action(f, "&Next slide in the worklist", lambda: self.worklist.step(1), "Alt+Down")
        self._action(f, "&Previous slide in the worklist", lambda: self.worklist.step(-1), "Alt+Up")
        self._action(f, "Open &demo slide", self._on_open_demo_triggered)
        self.recent_menu = f.addMenu("Open &recent")
        f.addSeparator()
        self._action(f, "&Import annotations (GeoJSON, ASAP XML)\u2026", self._on_import_triggered, "Ctrl+I")
        ex = f.addMenu("&Export")
        self._action(ex, "Annotations as QuPath &GeoJSON\u2026", lambda: self.annotations.export_geojson())
        self._action(ex, "Annotations as &ASAP XML\u2026", lambda: self.annotations.export_asap())
        self._action(ex, "Region &crops and masks\u2026", lambda: self.annotations.export_crops())
        self._action(ex, "&Report (CSV and JSON)\u2026", lambda: self.annotations.export_report())
        self._action(ex, "Current &view as PNG\u2026", self._on_export_view_triggered, "Ctrl+Shift+E")
        f.addSeparator()
        self._action(f, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        self._refresh_recent()

        e = mb.addMenu("&Edit")
        self._action(e, "&Undo", self.annotations.undo, QKeySequence.StandardKey.Undo)
        self._action(e, "&Redo", self.annotations.redo, "Ctrl+Shift+Z").setShortcuts(
            [QKeySequence("Ctrl+Shift+Z"), QKeySequence("Ctrl+Y")])
        self._action(e, "&Delete selected annotations", self.annotations.delete_selected, QKeySequence.StandardKey.Delete)

        tb = self.addToolBar("Main")
        tb.setObjectName("main-toolbar")
        self.heatmap_action = QAction("Heatmap", self)
        self.heatmap_action.setShortcut(QKeySequence("H"))
        self.heatmap_action.setToolTip("Show or hide the model's heatmap; the first time, compute it (H)")
        self.heatmap_action.triggered.connect(self.inference.toggle_visible)
        tb.addAction(self.heatmap_action)
        self._action(tb, "Fit", self.view.fit)
        tb.addSeparator()
        tools_menu = mb.addMenu("&Tools")
        self.tool_group = QActionGroup(self)
        self.tool_actions: dict[str, QAction] = {}
        for name, (label, key) in TOOLS.items():
            act = QAction(label.split(" (")[0], self)
            act.setToolTip(f"{label} ({key})")
            act.setShortcut(QKeySequence(key))
            act.setCheckable(True)
            act.triggered.connect(lambda _=False, n=name: self.annotations.set_tool(n))
            self.tool_group.addAction(act)
            tools_menu.addAction(act)
            tb.addAction(act)
            self.tool_actions[name] = act
        self.tool_actions["pan"].setChecked(True)

        v = mb.addMenu("&View")
        self._action(v, "Zoom &in", lambda: self.view.zoom_by(1.5), "Ctrl+=")
        self._action(v, "Zoom &out", lambda: self.view.zoom_by(1 / 1.5), "Ctrl+-")
        self._action(v, "&Fit slide", self.view.fit, "Ctrl+0")
        self._action(v, "&1:1 (one screen pixel per slide pixel)", lambda: self.view.set_scale(1.0), "Ctrl+1")
        self.mag_menu = v.addMenu("&Magnification")
        self.mag_group = QActionGroup(self)
        for mag in PRESETS:
            act = QAction(f"{mag:g}x", self)
            act.triggered.connect(lambda _=False, m=mag: self.set_magnification(m))
            self.mag_menu.addAction(act)
            self.mag_group.addAction(act)
        v.addSeparator()
        self.show_annotations_action = self._action(v, "Show &annotations", self.annotations.set_shown, "A")
        self.fill_annotations_action = self._action(v, "F&ill annotations", self.annotations.set_filled, "Shift+F")
        for act in (self.show_annotations_action, self.fill_annotations_action):
            act.setCheckable(True)
            act.setChecked(True)
        self._action(v, "&Brightness and contrast\u2026", self._on_adjust_triggered, "Ctrl+Shift+C")
        v.addSeparator()
        self.mpp_action = self._action(v, "Set &resolution (MPP)\u2026", self._on_set_mpp_triggered)
        v.addSeparator()
        for dock in self.findChildren(QDockWidget):
            v.addAction(dock.toggleViewAction())
        self._update_mag_actions()

        self.model_menu = mb.addMenu("&Model")
        self.model_menu.aboutToShow.connect(lambda: self.inference.picker.fill_menu(self.model_menu))
        h = mb.addMenu("&Help")
        self._action(h, "&Keyboard shortcuts", self._on_shortcuts_triggered, QKeySequence.StandardKey.HelpContents)
        self._action(h, "&About IDC Slide Viewer", self._on_about_triggered)

    def _refresh_recent(self) -> None:
        self.recent_menu.clear()
        for path in self.recent_files():
            act = QAction(path, self)
            act.triggered.connect(lambda _=False, p=path: self.open_path(p))
            self.recent_menu.addAction(act)
        self.recent_menu.setEnabled(bool(self.recent_files()))

    def recent_files(self) -> list[str]:
        value = self.settings.value("recent", [])
        if isinstance(value, str):
            value = [value]
        return [str(v) for v in (value or [])]

    def remember_recent(self, path: Path) -> None:
        p = str(path.resolve())
        items = [p] + [r for r in self.recent_files() if r != p]
        self.settings.setValue("recent", items[:MAX_RECENT])
        self._refresh_recent()

    # -- opening ----------------------------------------------------------------------------
    def open_path(self, path: str | Path, mpp: float | None = None) -> bool:
        """Open a slide; on failure show one sentence and keep the current slide."""
        try:
            slide = open_slide(path, mpp=mpp)
        except SlideError as exc:
            self.show_error("Cannot open slide", str(exc))
            return False
        except Exception as exc:  # never let a decoder bug take the app down
            log.exception("unexpected error opening %s", path)
            self.show_error("Cannot open slide", f"{Path(path).name} could not be opened ({type(exc).__name__}).")
            return False
        self.set_slide(slide)
        self.remember_recent(Path(path))
        return True

    @property
    def slide(self) -> Slide | None:
        return self.session.slide

    def set_slide(self, slide: Slide) -> None:
        """Open an already opened slide (the session owns it from now on)."""
        self.session.open(slide)

    @Slot()
    def _on_session_slide_closing(self) -> None:
        self.view.clear_slide()  # stops the old slide's tile reads before its file closes

    @Slot(object)
    def _on_session_slide_changed(self, slide: Slide | None) -> None:
        self._tile_error_shown = False
        self.statusBar().clearMessage()  # the previous slide's messages are not about this one
        self.pos_label.setText("")
        self.metadata.set_slide(slide)
        if slide is None:
            self.setWindowTitle("IDC Slide Viewer")
            self._update_mag_actions()
            return
        self.setWindowTitle(f"{slide.path.name} \u2014 IDC Slide Viewer")
        self.view.set_slide(slide)
        self.overview.set_thumbnail(slide.dimensions, None)
        self._update_mag_actions()
        if self.view.loader is not None:
            self.view.loader.tile_loaded.connect(self._on_loader_tile_loaded)

    @Slot(object)
    def _on_session_resolution_changed(self, slide: Slide) -> None:
        self.view.slide = slide
        self.metadata.set_slide(slide)
        self._update_mag_actions()
        self.view.viewport().update()
        self._on_view_viewport_changed(self.view.view_rect_l0(), self.view.scale_factor)

    @Slot(object, object)
    def _on_loader_tile_loaded(self, key: TileKey, arr: np.ndarray) -> None:
        tiles = self.view.tiles
        if tiles is None or key.level != tiles.grid.coarsest or key.slide != tiles.grid.slide_id:
            return
        if not all(k in tiles.pinned for k in tiles.coarsest_keys()):
            return
        self.overview.set_thumbnail(self.slide.dimensions if self.slide else (1, 1), self._coarsest_image())
        self.overview.set_view(self.view.view_rect_l0())

    def _coarsest_image(self) -> np.ndarray:
        """Assemble the pinned coarsest tiles into one thumbnail array."""
        tiles = self.view.tiles
        assert tiles is not None
        grid = tiles.grid
        rows, cols = grid.shape(grid.coarsest)
        parts = [[qimage_to_array(tiles.pinned[TileKey(grid.slide_id, grid.coarsest, r, c)].toImage())
                  for c in range(cols)] for r in range(rows)]
        return np.concatenate([np.concatenate(row, axis=1) for row in parts], axis=0)

    @Slot()
    def _on_open_triggered(self) -> None:
        start = str(Path(self.recent_files()[0]).parent) if self.recent_files() else str(Path.home())
        path, _ = QFileDialog.getOpenFileName(self, "Open slide", start, SLIDE_FILTER)
        if path:
            self.open_path(path)

    @Slot()
    def _on_open_folder_triggered(self) -> None:
        start = str(Path(self.recent_files()[0]).parent) if self.recent_files() else str(Path.home())
        folder = QFileDialog.getExistingDirectory(self, "Open a folder of slides", start)
        if folder:
            self.open_folder(folder)

    def open_folder(self, folder: str | Path) -> int:
        """Show a folder's slides in the worklist tab; returns how many were found."""
        n = self.worklist.open_folder(folder)
        self.tabs.setCurrentWidget(self.worklist)
        return n

    @Slot(object)
    def _on_worklist_open_requested(self, path: Path) -> None:
        """Open a worklist slide with its heatmap: at once from the cache, else computed now."""
        if not self.open_path(path):
            return
        self.tabs.setCurrentWidget(self.view)
        self.inference.show_box.setChecked(True)
        if self.slide is not None and self.slide.mpp is not None:  # start() keeps a complete heatmap
            self.inference.start()

    @Slot()
    def _on_open_demo_triggered(self) -> None:
        self.open_path(demo_slide_path())

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        for url in event.mimeData().urls():
            if url.isLocalFile():
                self.open_path(url.toLocalFile())
                event.acceptProposedAction()
                return

    # -- resolution -------------------------------------------------------------------------
    @Slot()
    def _on_adjust_triggered(self) -> None:
        if self._adjust_dialog is None:
            self._adjust_dialog = AdjustDialog(self)
            self._adjust_dialog.changed.connect(self.view.set_adjustment)
        self._adjust_dialog.show()
        self._adjust_dialog.raise_()

    @Slot()
    def _on_shortcuts_triggered(self) -> None:
        self.shortcuts_dialog = ShortcutsDialog(self.findChildren(QAction), self)
        self.shortcuts_dialog.show()

    @Slot()
    def _on_about_triggered(self) -> None:
        model = self.session.model
        text = (f"IDC Slide Viewer: whole-slide viewing with an invasive ductal carcinoma heatmap.\n\n"
                f"Model: {model.model_id if model else 'none'}; its card is {resource_path('MODEL_CARD.md')}.")
        if self.interactive:
            QMessageBox.about(self, "About IDC Slide Viewer", text)

    @Slot()
    def _on_set_mpp_triggered(self) -> None:
        if self.slide is None:
            return
        current = self.slide.mpp or 0.25
        value, ok = QInputDialog.getDouble(
            self, "Slide resolution", "Micrometres per level-0 pixel (40x \u2248 0.25, 20x \u2248 0.5):",
            current, 0.01, 100.0, 4,
        )
        if ok:
            self.set_mpp(value)

    def set_mpp(self, mpp: float) -> None:
        """Set the slide's resolution by hand; everything physical follows it."""
        try:
            self.session.set_mpp(mpp)
        except SlideError as exc:
            self.show_error("Invalid resolution", str(exc))

    def set_magnification(self, mag: float) -> None:
        scale = self.view.scale_for_magnification(mag)
        if scale is not None:
            self.view.set_scale(scale)

    def _update_mag_actions(self) -> None:
        known = self.slide is not None and self.view.scale_for_magnification(1.0) is not None
        self.mag_menu.setEnabled(known)
        self.mag_menu.setTitle("&Magnification" if known or self.slide is None
                               else "&Magnification (resolution unknown)")

    # -- status -----------------------------------------------------------------------------
    @Slot(object, float)
    def _on_view_viewport_changed(self, view_l0: Rect, scale: float) -> None:
        self.overview.set_view(view_l0)
        mag = self.view.magnification()
        mag_text = f"{mag:.2f}x" if mag is not None else "magnification unknown"
        self.zoom_label.setText(f"{mag_text}  |  {scale * 100:.1f}% of level 0")

    @Slot(float, float)
    def _on_view_cursor_moved(self, x_l0: float, y_l0: float) -> None:
        if self.slide is None:
            return
        w, h = self.slide.dimensions
        if not (0 <= x_l0 < w and 0 <= y_l0 < h):
            self.pos_label.setText("")
            return
        text = f"x {int(x_l0):,}  y {int(y_l0):,} px"
        prob = self.inference.probability_at(x_l0, y_l0)
        if prob is not None:
            text = f"P({self.session.model.meta.positive_class}) {prob:.2f}   " + text
        if self.slide.mpp:
            text += f"   ({x_l0 * self.slide.mpp:,.1f}, {y_l0 * self.slide.mpp:,.1f} \u00b5m)"
        else:
            text += "   (\u00b5m unknown: set the resolution in the View menu)"
        self.pos_label.setText(text)

    @Slot(object)
    def _on_training_model_accepted(self, model: LoadedModel) -> None:
        """Switch the viewer to the fine-tuned model and recompute the open slide's heatmap."""
        self.tabs.setCurrentWidget(self.view)
        self.inference.show_box.setChecked(True)
        self.models.add(model)
        self.session.set_model(model)
        self.inference.start()

    @Slot()
    def _on_import_triggered(self) -> None:
        start = str(self.slide.path.parent) if self.slide is not None else str(Path.home())
        path, _ = QFileDialog.getOpenFileName(self, "Import annotations", start,
                                              "Annotations (*.geojson *.json *.xml);;All files (*)")
        if path:
            self.annotations.import_file(path)

    @Slot()
    def _on_export_view_triggered(self) -> None:
        if self.slide is None:
            return
        default = str(self.slide.path.with_name(self.slide.path.stem + "_view.png"))
        path, _ = QFileDialog.getSaveFileName(self, "Export current view", default, "PNG (*.png)")
        if path and not self.view.grab().save(path, "PNG"):
            self.show_error("Cannot export view", f"{path} could not be written.")

    @Slot()
    def _on_inference_mpp_needed(self) -> None:
        if self.interactive:
            self._on_set_mpp_triggered()
            if self.slide is not None and self.slide.mpp is not None:
                self.inference.start()

    @Slot(str)
    def _on_inference_status_message(self, message: str) -> None:
        self.statusBar().showMessage(message, 10000)

    @Slot(str)
    def _on_view_tile_failed(self, message: str) -> None:
        if not self._tile_error_shown:
            self._tile_error_shown = True
            self.statusBar().showMessage(f"Part of the slide could not be read: {message}", 10000)

    @Slot(float, float)
    def _on_overview_navigate_requested(self, x_l0: float, y_l0: float) -> None:
        self.view.center_on_l0(x_l0, y_l0)

    def show_error(self, title: str, message: str) -> None:
        """One sentence to the user: a dialog when interactive, the log otherwise."""
        log.error("%s: %s", title, message)
        self.error_shown.emit(message)
        if self.interactive:
            QMessageBox.critical(self, title, message)

    def closeEvent(self, event: QCloseEvent) -> None:
        self.training.shutdown()  # the only place that waits for background threads
        self.worklist.shutdown()
        self.inference.shutdown()
        self.annotations.shutdown()
        self.session.open(None)  # saves the annotations, stops reads, closes the file
        super().closeEvent(event)
