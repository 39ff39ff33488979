"""Annotations of the open slide: store, scene layer, autosave, import and export."""

from __future__ import annotations

import logging
from pathlib import Path

import shapely
from PySide6.QtCore import QObject, QTimer, Signal, Slot
from PySide6.QtWidgets import QFileDialog, QInputDialog, QWidget
from shapely.geometry.base import BaseGeometry

from inference.annotation_io import (
    autosave_path,
    dumps_asap,
    dumps_geojson,
    load_into,
    read_file,
    save_store,
)
from inference.annotations import Annotation, AnnotationError, AnnotationStore
from inference.atomic import write_bytes
from inference.export import ExportProgress, iter_export_regions, report, write_report
from inference.heatmap import Heatmap
from inference.slide import Slide
from viewer.annotation_layer import AnnotationLayer
from viewer.annotation_panel import AnnotationPanel
from viewer.session import SlideSession
from viewer.slide_view import SlideView
from viewer.tools import distance_text
from viewer.workers import JobRunner

log = logging.getLogger(__name__)

AUTOSAVE_DELAY_MS = 800


class AnnotationController(QObject):
    """Connects the view's tools, the annotation panel and the store of the open slide."""

    error = Signal(str, str)  # title, one sentence
    message = Signal(str)
    export_finished = Signal(object)  # the folder a crop export completed in

    def __init__(self, session: SlideSession, view: SlideView, panel: AnnotationPanel,
                 parent_widget: QWidget) -> None:
        super().__init__(parent_widget)
        self.session = session
        self.view, self.panel, self.parent_widget = view, panel, parent_widget
        self.layer: AnnotationLayer | None = None
        self.save_path: Path | None = None
        self._dirty = False
        self._timer = QTimer(self, singleShot=True, interval=AUTOSAVE_DELAY_MS)
        self._timer.timeout.connect(self.save_now)
        self.exporter = JobRunner(self)
        self.exporter.report.connect(self._on_exporter_report)
        self.exporter.failed.connect(self._on_exporter_failed)
        self.exporter.finished.connect(self._on_exporter_finished)
        self._export_dir: Path | None = None
        self._exported = 0
        self.shown, self.filled = True, True
        panel.export_cancel.clicked.connect(self.cancel_export)
        session.slide_closing.connect(self._on_session_slide_closing)
        session.slide_changed.connect(self._on_session_slide_changed)
        session.resolution_changed.connect(self._on_session_resolution_changed)
        session.heatmap_changed.connect(self._on_session_heatmap_changed)
        view.geometry_drawn.connect(self._on_view_geometry_drawn)
        view.scene().selectionChanged.connect(self._on_scene_selection_changed)
        panel.selection_changed.connect(self._on_panel_selection_changed)
        panel.go_to.connect(self._on_panel_go_to)
        panel.visible_classes_changed.connect(self._on_panel_visible_classes_changed)

    @property
    def slide(self) -> Slide | None:
        return self.session.slide

    @property
    def store(self) -> AnnotationStore | None:
        return self.session.store

    @property
    def heatmap(self) -> Heatmap | None:
        return self.session.heatmap

    # -- slide lifecycle --------------------------------------------------------------------
    @Slot()
    def _on_session_slide_closing(self) -> None:
        """Save the open slide's annotations and drop their layer; an export of it stops."""
        self.cancel_export()
        self.save_now()
        if self.layer is not None:
            self.layer.detach()
        if self.store is not None:
            self.store.unsubscribe(self._on_store_changed)
        self.layer, self.save_path = None, None
        self.panel.set_store(None, None)

    @Slot(object)
    def _on_session_slide_changed(self, slide: Slide | None) -> None:
        """Restore the new slide's autosave into the session's (new, empty) store."""
        store = self.store
        if slide is None or store is None:
            return
        self.save_path = autosave_path(slide.path, slide.fingerprint())
        if self.save_path.exists():
            try:
                load_into(store, read_file(self.save_path))
                store.clear_history()  # restoring is not an undoable edit
            except AnnotationError as exc:
                self.error.emit("Annotations not restored", f"{exc} The file was left untouched.")
                self.save_path = self.save_path.with_name(self.save_path.stem + ".recovered.geojson")
        store.subscribe(self._on_store_changed)
        self.layer = AnnotationLayer(self.view.scene(), store)
        self.layer.set_editable(self.view.tool_name == "select")
        self.layer.set_shown(self.shown)
        self.layer.set_fill(self.filled)
        self.panel.set_store(store, slide.mpp)

    @Slot(object)
    def _on_session_resolution_changed(self, slide: Slide) -> None:
        if self.store is not None:
            self.panel.set_store(self.store, slide.mpp)

    @Slot(object)
    def _on_session_heatmap_changed(self, heatmap: Heatmap | None) -> None:
        self.panel.set_heatmap(heatmap)

    @Slot(bool)
    def set_shown(self, shown: bool) -> None:
        """View > Show annotations (kept across slides)."""
        self.shown = shown
        if self.layer is not None:
            self.layer.set_shown(shown)

    @Slot(bool)
    def set_filled(self, filled: bool) -> None:
        """View > Fill annotations (kept across slides)."""
        self.filled = filled
        if self.layer is not None:
            self.layer.set_fill(filled)

    def set_tool(self, name: str) -> None:
        self.view.set_tool(name)
        if self.layer is not None:
            self.layer.set_editable(name == "select")

    # -- autosave ---------------------------------------------------------------------------
    def _on_store_changed(self) -> None:
        self._dirty = True
        self._timer.start()
        if self.layer is not None:
            self.layer.set_editable(self.view.tool_name == "select")

    @Slot()
    def save_now(self) -> None:
        """Write the autosave file now if anything changed (atomic)."""
        self._timer.stop()
        if not self._dirty or self.store is None or self.save_path is None:
            return
        try:
            save_store(self.save_path, self.store)
            self._dirty = False
        except OSError as exc:
            log.exception("autosave failed")
            self.error.emit("Annotations not saved", f"Annotations could not be saved to {self.save_path} ({exc.strerror}).")

    # -- editing ----------------------------------------------------------------------------
    @Slot(str, object)
    def _on_view_geometry_drawn(self, tool: str, geom: BaseGeometry) -> None:
        if tool == "ruler":  # a measurement, not an annotation
            mpp = self.slide.mpp if self.slide is not None else None
            self.message.emit(f"Distance: {distance_text(geom.length, mpp)} ({geom.length:,.0f} px at level 0).")
            return
        if self.store is None:
            return
        cls = self.panel.current_class()
        selected = self.layer.selected_ids() if self.layer is not None else []
        target = self.store.get(selected[0]) if tool == "brush" and len(selected) == 1 else None
        if target is not None and target.cls == cls and target.geometry.geom_type in ("Polygon", "MultiPolygon"):
            self.store.update(target.id, geometry=shapely.union_all([target.geometry, geom]))
            return
        n = sum(1 for a in self.store.items if a.cls == cls) + 1
        ann = Annotation(geometry=geom, cls=cls, name=f"{cls} {n}")
        self.store.add(ann)

    def delete_selected(self) -> None:
        if self.store is not None and self.layer is not None:
            ids = self.layer.selected_ids() or self.panel.selected_ids()
            if ids:
                self.store.remove(*ids)

    def undo(self) -> None:
        if self.store is not None:
            self.store.undo()

    def redo(self) -> None:
        if self.store is not None:
            self.store.redo()

    @Slot()
    def _on_scene_selection_changed(self) -> None:
        if self.layer is None:
            return
        ids = self.layer.selected_ids()
        self.panel.select_ids(ids)
        self.layer.set_editable(self.view.tool_name == "select")

    @Slot(list)
    def _on_panel_selection_changed(self, ids: list[str]) -> None:
        if self.layer is not None:
            self.layer.select(ids)

    @Slot(str)
    def _on_panel_go_to(self, ann_id: str) -> None:
        a = self.store.get(ann_id) if self.store is not None else None
        if a is None:
            return
        minx, miny, maxx, maxy = a.geometry.bounds
        vp = self.view.viewport().rect()
        w, h = max(maxx - minx, 1), max(maxy - miny, 1)
        scale = min(vp.width() / (w * 1.5), vp.height() / (h * 1.5))
        self.view.set_scale(min(scale, max(self.view.scale_factor, 1.0)))
        self.view.center_on_l0((minx + maxx) / 2, (miny + maxy) / 2)

    @Slot(object)
    def _on_panel_visible_classes_changed(self, classes: set[str] | None) -> None:
        if self.layer is not None:
            self.layer.set_visible_classes(classes)

    # -- import / export --------------------------------------------------------------------
    def import_file(self, path: str | Path) -> bool:
        """Add annotations from GeoJSON or ASAP XML; a bad file changes nothing."""
        if self.store is None:
            return False
        try:
            result = read_file(path)
        except AnnotationError as exc:
            self.error.emit("Cannot import annotations", str(exc))
            return False
        added = load_into(self.store, result)
        same = len(result.annotations) - added
        msg = f"Imported {added} annotation{'' if added == 1 else 's'} from {Path(path).name}"
        if same:
            msg += f" ({same} already there, not duplicated)"
        if result.skipped:
            msg += f"; skipped {len(result.skipped)} ({result.skipped[0]}{', ...' if len(result.skipped) > 1 else ''})"
        self.message.emit(msg + ".")
        return True

    def _chosen(self) -> list[Annotation]:
        """Selected annotations, or all of them when none is selected."""
        if self.store is None:
            return []
        ids = set(self.layer.selected_ids()) if self.layer is not None else set()
        return [a for a in self.store.items if a.id in ids] or list(self.store.items)

    def _ask_path(self, title: str, suffix: str, filt: str) -> Path | None:
        if self.slide is None:
            return None
        default = str(self.slide.path.with_name(self.slide.path.stem + suffix))
        path, _ = QFileDialog.getSaveFileName(self.parent_widget, title, default, filt)
        return Path(path) if path else None

    def export_geojson(self, path: Path | None = None) -> Path | None:
        path = path or self._ask_path("Export GeoJSON", ".geojson", "GeoJSON (*.geojson *.json)")
        if path is None or self.store is None:
            return None
        write_bytes(path, dumps_geojson(self._chosen(), self.store, self._measurements()))
        self.message.emit(f"Wrote {path}.")
        return path

    def export_asap(self, path: Path | None = None) -> Path | None:
        path = path or self._ask_path("Export ASAP XML", ".xml", "ASAP XML (*.xml)")
        if path is None or self.store is None:
            return None
        write_bytes(path, dumps_asap(self._chosen(), self.store))
        self.message.emit(f"Wrote {path}.")
        return path

    def _measurements(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        mpp = self.slide.mpp if self.slide is not None else None
        for a in self._chosen():
            m: dict[str, float] = {}
            area = a.area_um2(mpp)
            if area is not None:
                m["Area \u00b5m^2"] = area
            mean, frac = a.heatmap_stats(self.heatmap)
            if mean is not None:
                m["Mean P(IDC)"] = mean
                m["IDC fraction"] = frac or 0.0
            out[a.id] = m
        return out

    def export_report(self, out_dir: Path | None = None) -> list[Path]:
        if self.slide is None or self.store is None:
            return []
        out_dir = out_dir or self._ask_dir("Folder for the report")
        if out_dir is None:
            return []
        paths = write_report(report(self._chosen(), self.slide, self.heatmap), out_dir, self.slide.path.stem)
        self.message.emit(f"Wrote {', '.join(p.name for p in paths)} to {out_dir}.")
        return paths

    def export_crops(self, out_dir: Path | None = None, mpp_out: float | None = None,
                     overlay: bool | None = None) -> bool:
        """Start writing a crop and mask per region (selected, else all) as a background job.

        The default resolution is the slide's own (never finer); the panel shows progress and
        Cancel, and the status bar says what was written.
        """
        if self.slide is None or self.store is None or not self.store.items or self.exporter.running():
            return False
        if out_dir is None:
            out_dir = self._ask_dir("Folder for the region crops")
            if out_dir is None:
                return False
            mpp = self.slide.mpp
            value, ok = QInputDialog.getDouble(
                self.parent_widget, "Crop resolution",
                "\u00b5m per pixel (0 = the slide's full resolution; never finer than the slide):",
                mpp or 0.0, mpp or 0.0, 100.0, 3)
            if not ok:
                return False
            mpp_out = value or None
            overlay = QInputDialog.getItem(self.parent_widget, "Overlay", "Draw on the crops:",
                                           ["Nothing", "Outline and heatmap"], 1, False)[0] != "Nothing"
        slide, chosen, heatmap, store = self.slide, self._chosen(), self.heatmap, self.store
        self._export_dir, self._exported = out_dir, 0
        self.panel.show_export((0, len(chosen)))
        self.exporter.start(lambda: iter_export_regions(slide, chosen, out_dir, mpp_out, bool(overlay),
                                                        heatmap, store))
        return True

    def shutdown(self) -> None:
        """Stop an export and wait for its thread (closing the window)."""
        self.exporter.shutdown()

    @Slot()
    def cancel_export(self) -> None:
        if self.exporter.running():
            self.exporter.stop()
            self.panel.show_export(None)
            self.message.emit(f"Export cancelled; the {self._exported} region(s) written so far are complete.")

    @Slot(object)
    def _on_exporter_report(self, step: ExportProgress) -> None:
        self._exported = step.done
        self.panel.show_export((step.done, step.total))

    @Slot(str)
    def _on_exporter_failed(self, message: str) -> None:
        self.panel.show_export(None)
        self.error.emit("Cannot export crops", message)

    @Slot(bool)
    def _on_exporter_finished(self, completed: bool) -> None:
        self.panel.show_export(None)
        if completed:
            self.message.emit(f"Wrote the crops, masks and report of {self._exported} region(s) to {self._export_dir}.")
            self.export_finished.emit(self._export_dir)

    def _ask_dir(self, title: str) -> Path | None:
        start = str(self.slide.path.parent) if self.slide is not None else ""
        path = QFileDialog.getExistingDirectory(self.parent_widget, title, start)
        return Path(path) if path else None
