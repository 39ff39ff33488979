"""The slide view: a QGraphicsView whose scene unit is one level-0 pixel."""

from __future__ import annotations

import math

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QColor, QFont, QKeyEvent, QMouseEvent, QPainter, QPen, QWheelEvent
from PySide6.QtWidgets import QFrame, QGraphicsScene, QGraphicsView, QWidget

from inference.geometry import Rect
from inference.slide import Slide
from inference.tiles import TileGrid, TileKey
from viewer.layers import BrightnessContrastEffect, TileLayer, rect_from_qrectf
from viewer.tools import TOOL_CLASSES, RulerTool, Tool
from viewer.workers import TileLoader

#: The usual magnification convention: 10x objective ~ 1 um per pixel.
MAG_UM = 10.0
PRESETS = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0)


def nice_length(max_um: float) -> float:
    """The largest 1, 2 or 5 x 10^k micrometres not above ``max_um``."""
    if max_um <= 0:
        return 0.0
    exp = math.floor(math.log10(max_um))
    for m in (5, 2, 1):
        if m * 10**exp <= max_um:
            return m * 10**exp
    return 10 ** (exp - 1) * 5


def format_length(um: float) -> str:
    if um >= 1000:
        mm = um / 1000
        return f"{mm:g} mm"
    return f"{um:g} \u00b5m"


#: At most one repaint for newly loaded tiles per this many ms (about 30 frames per second).
REPAINT_MS = 33


class SlideView(QGraphicsView):
    """Pan and zoom over a slide; the view transform is the only display state."""

    viewport_changed = Signal(object, float)  # Rect (level-0 px) in view, scale (screen px / l0 px)
    cursor_moved = Signal(float, float)  # level-0 px under the cursor
    became_sharp = Signal()  # every visible tile is at its final resolution
    tile_failed = Signal(str)
    geometry_drawn = Signal(str, object)  # tool name, shapely geometry in level-0 px

    def __init__(self, parent: QWidget | None = None, repaint_ms: int = REPAINT_MS) -> None:
        super().__init__(parent)
        self.setScene(QGraphicsScene(self))
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setBackgroundBrush(QColor(238, 238, 238))
        self.setDragMode(QGraphicsView.DragMode.ScrollHandDrag)
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.AnchorUnderMouse)
        self.setResizeAnchor(QGraphicsView.ViewportAnchor.AnchorViewCenter)
        self.setViewportUpdateMode(QGraphicsView.ViewportUpdateMode.SmartViewportUpdate)
        self.setOptimizationFlag(QGraphicsView.OptimizationFlag.DontSavePainterState, True)
        self.setMouseTracking(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.slide: Slide | None = None
        self._adjust = (0.0, 1.0)
        self.tool: Tool | None = None
        self.tool_name = "pan"
        self.tiles: TileLayer | None = None
        self.loader: TileLoader | None = None
        self._sharp_emitted = False
        self._fitted = False  # stays fitted across resizes until the user zooms or pans
        self._check = QTimer(self, singleShot=True, interval=0)
        self._check.timeout.connect(self._on_check_timeout)
        # Tiles arriving together are drawn together: one repaint per repaint_ms, not one per tile
        # (0: a repaint at every pass of the event loop that brought tiles, as before batching).
        self._repaint = QTimer(self, singleShot=True, interval=repaint_ms)
        self._repaint.timeout.connect(self._flush_tiles)
        self.horizontalScrollBar().valueChanged.connect(self.request_update)
        self.verticalScrollBar().valueChanged.connect(self.request_update)

    # -- slide ------------------------------------------------------------------------------
    def set_slide(self, slide: Slide) -> None:
        """Show a slide (the caller owns it and closes it after ``clear_slide``)."""
        self.clear_slide()
        self.slide = slide
        w, h = slide.dimensions
        grid = TileGrid(slide.fingerprint(), (w, h))
        self.loader = TileLoader(slide, grid, parent=self)
        self.loader.tile_loaded.connect(self._on_loader_tile_loaded)
        self.loader.tile_failed.connect(self._on_loader_tile_failed)
        self.tiles = TileLayer(grid)
        self.tiles.request_tile = self._request_tile
        self.adjustment = BrightnessContrastEffect()
        self.adjustment.set_values(*self._adjust)
        self.tiles.setGraphicsEffect(self.adjustment)
        self.scene().addItem(self.tiles)
        margin = max(w, h) * 0.5
        self.scene().setSceneRect(QRectF(-margin, -margin, w + 2 * margin, h + 2 * margin))
        for key in self.tiles.coarsest_keys():
            self.loader.request(key)
        self._sharp_emitted = False
        self.fit()

    def set_adjustment(self, brightness: float, contrast: float) -> None:
        """Brightness in [-1, 1] and contrast factor of the slide as shown (kept across slides)."""
        self._adjust = (brightness, contrast)
        if self.tiles is not None:
            self.adjustment.set_values(brightness, contrast)

    def clear_slide(self) -> None:
        """Stop tile reads and forget the slide's layers."""
        if self.loader is not None:
            self.loader.shutdown()
            self.loader.deleteLater()
        if self.tiles is not None:
            self.scene().removeItem(self.tiles)
        self.loader, self.tiles, self.slide = None, None, None

    @Slot(object)
    def _request_tile(self, key: TileKey) -> None:
        if self.loader is not None and self.loader.request(key):
            self._sharp_emitted = False

    @Slot(object, object)
    def _on_loader_tile_loaded(self, key: TileKey, arr: np.ndarray) -> None:
        if self.tiles is None or key.slide != self.tiles.grid.slide_id:
            return
        self.tiles.add_tile(key, arr)
        if not self._repaint.isActive():
            self._repaint.start()
        self._check.start()

    @Slot()
    def _flush_tiles(self) -> None:
        self._repaint.stop()
        if self.tiles is not None:
            self.tiles.flush()

    @Slot(object, str)
    def _on_loader_tile_failed(self, key: TileKey, message: str) -> None:
        self.tile_failed.emit(message)

    # -- tools ------------------------------------------------------------------------------
    def set_tool(self, name: str) -> None:
        """'pan', 'select' or a drawing tool of viewer.tools.TOOL_CLASSES."""
        if self.tool is not None:
            self.tool.close()
            self.tool = None
        self.tool_name = name
        if name == "pan":
            self.setDragMode(QGraphicsView.DragMode.ScrollHandDrag)
        elif name == "select":
            self.setDragMode(QGraphicsView.DragMode.RubberBandDrag)
        else:
            self.setDragMode(QGraphicsView.DragMode.NoDrag)
            self.tool = TOOL_CLASSES[name](self.scene(), self._on_tool_finished, lambda: self.scale_factor)
            if isinstance(self.tool, RulerTool):
                self.tool.mpp = lambda: self.slide.mpp if self.slide is not None else None
        self.viewport().setCursor(Qt.CursorShape.CrossCursor if self.tool else Qt.CursorShape.ArrowCursor)

    def _on_tool_finished(self, geom: object) -> None:
        self.geometry_drawn.emit(self.tool_name, geom)

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if self.tool is not None and event.button() == Qt.MouseButton.LeftButton:
            self.tool.release(self.mapToScene(event.position().toPoint()))
            event.accept()
            return
        super().mouseReleaseEvent(event)

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:
        if self.tool is not None:
            self.tool.double_click(self.mapToScene(event.position().toPoint()))
            event.accept()
            return
        super().mouseDoubleClickEvent(event)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def scale_factor(self) -> float:
        """Screen pixels per level-0 pixel."""
        return self.transform().m11()

    def view_rect_l0(self) -> Rect:
        """The visible part of the scene, in level-0 pixels."""
        return rect_from_qrectf(self.mapToScene(self.viewport().rect()).boundingRect())

    def scale_limits(self) -> tuple[float, float]:
        if self.slide is None:
            return 1e-3, 16.0
        w, h = self.slide.dimensions
        vp = self.viewport().size()
        fit = min(vp.width() / w, vp.height() / h)
        hi = 16.0
        if self.slide.mpp:
            hi = max(hi, self.scale_for_magnification(40.0) or hi)
        return min(fit * 0.5, 1.0), hi

    def magnification(self) -> float | None:
        """Apparent objective magnification of the current view, if the slide's scale is known."""
        return self.magnification_at(self.scale_factor)

    def magnification_at(self, scale: float) -> float | None:
        if self.slide is None:
            return None
        if self.slide.mpp:
            return MAG_UM * scale / self.slide.mpp
        if self.slide.info.objective_power:
            return self.slide.info.objective_power * scale
        return None

    def scale_for_magnification(self, mag: float) -> float | None:
        if self.slide is None:
            return None
        if self.slide.mpp:
            return mag * self.slide.mpp / MAG_UM
        if self.slide.info.objective_power:
            return mag / self.slide.info.objective_power
        return None

    # -- navigation -------------------------------------------------------------------------
    def set_scale(self, scale: float, anchor_scene: QPointF | None = None) -> None:
        """Zoom to ``scale`` screen px per level-0 px, keeping ``anchor_scene`` still on screen."""
        lo, hi = self.scale_limits()
        scale = min(max(scale, lo), hi)
        self._fitted = False
        if anchor_scene is None:
            anchor_scene = self.mapToScene(self.viewport().rect().center())
        anchor_view = self.mapFromScene(anchor_scene)
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.NoAnchor)
        self.resetTransform()
        self.scale(scale, scale)
        # Put the anchor back under the same screen point.
        delta = self.mapToScene(anchor_view) - anchor_scene
        self.translate(delta.x(), delta.y())
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.AnchorUnderMouse)
        self.request_update()

    def zoom_by(self, factor: float, anchor_scene: QPointF | None = None) -> None:
        self.set_scale(self.scale_factor * factor, anchor_scene)

    def fit(self) -> None:
        if self.slide is None:
            return
        w, h = self.slide.dimensions
        vp = self.viewport().size()
        self.resetTransform()
        s = min(vp.width() / w, vp.height() / h) * 0.97
        self.scale(s, s)
        self.centerOn(w / 2, h / 2)
        self._fitted = True
        self.request_update()

    def center_on_l0(self, x_l0: float, y_l0: float) -> None:
        self._fitted = False
        self.centerOn(x_l0, y_l0)
        self.request_update()

    def wheelEvent(self, event: QWheelEvent) -> None:
        steps = event.angleDelta().y() / 120.0
        if steps:
            self.zoom_by(1.25**steps, self.mapToScene(event.position().toPoint()))
        event.accept()

    def keyPressEvent(self, event: QKeyEvent) -> None:
        key = event.key()
        if self.tool is not None and self.tool.key(key):
            event.accept()
            return
        step = 0.2
        vp = self.viewport().rect()
        if key in (Qt.Key.Key_Plus, Qt.Key.Key_Equal):
            self.zoom_by(1.5)
        elif key in (Qt.Key.Key_Minus, Qt.Key.Key_Underscore):
            self.zoom_by(1 / 1.5)
        elif key == Qt.Key.Key_0:
            self.fit()
        elif key in (Qt.Key.Key_Left, Qt.Key.Key_Right):
            d = -1 if key == Qt.Key.Key_Left else 1
            self._fitted = False
            sb = self.horizontalScrollBar()
            sb.setValue(sb.value() + int(d * step * vp.width()))
        elif key in (Qt.Key.Key_Up, Qt.Key.Key_Down):
            d = -1 if key == Qt.Key.Key_Up else 1
            self._fitted = False
            sb = self.verticalScrollBar()
            sb.setValue(sb.value() + int(d * step * vp.height()))
        else:
            super().keyPressEvent(event)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        p = self.mapToScene(event.position().toPoint())
        self.cursor_moved.emit(p.x(), p.y())
        if self.tool is not None:
            self.tool.move(p, bool(event.buttons() & Qt.MouseButton.LeftButton))
            event.accept()
            return
        super().mouseMoveEvent(event)

    def mousePressEvent(self, event: QMouseEvent) -> None:
        self._fitted = False
        if self.tool is not None and event.button() == Qt.MouseButton.LeftButton:
            self.tool.press(self.mapToScene(event.position().toPoint()))
            event.accept()
            return
        super().mousePressEvent(event)

    def resizeEvent(self, event) -> None:  # noqa: ANN001
        super().resizeEvent(event)
        if self._fitted:
            self.fit()
        self.request_update()

    @Slot()
    def request_update(self, *_args: object) -> None:
        if self.slide is None:
            return
        if self.loader is not None:
            self.loader.new_generation()
        self.viewport_changed.emit(self.view_rect_l0(), self.scale_factor)
        self._sharp_emitted = False
        self._check.start()

    # -- sharpness --------------------------------------------------------------------------
    def missing_tiles(self) -> list[TileKey]:
        """Visible tiles not yet at their final resolution (requests them)."""
        if self.tiles is None:
            return []
        grid = self.tiles.grid
        view = self.view_rect_l0().intersect(Rect(0, 0, grid.width_l0, grid.height_l0))
        if view.is_empty:
            return []
        scale = self.scale_factor * self.devicePixelRatioF()
        missing = self.tiles.missing(view, scale)
        for key in missing:
            self._request_tile(key)
        return missing

    def is_sharp(self) -> bool:
        if self.tiles is None:
            return False
        pinned_ready = all(k in self.tiles.pinned for k in self.tiles.coarsest_keys())
        return pinned_ready and not self.missing_tiles()

    @Slot()
    def _on_check_timeout(self) -> None:
        if not self._sharp_emitted and self.is_sharp():
            self._flush_tiles()  # the last tiles are drawn now, not at the next batch
            self._sharp_emitted = True
            self.became_sharp.emit()

    # -- scale bar --------------------------------------------------------------------------
    def drawForeground(self, painter: QPainter, rect: QRectF) -> None:
        if self.slide is None:
            return
        painter.save()
        painter.resetTransform()
        vp = self.viewport().rect()
        font = QFont(self.font())
        font.setPointSizeF(max(9.0, font.pointSizeF()))
        painter.setFont(font)
        if self.slide.mpp:
            um_per_screen_px = self.slide.mpp / self.scale_factor
            length_um = nice_length(160 * um_per_screen_px)
            bar_px = length_um / um_per_screen_px
            text = format_length(length_um)
        else:
            bar_px = 0
            text = "Scale unknown: View \u25b8 Set resolution (MPP)\u2026"
        fm = painter.fontMetrics()
        box_w = max(bar_px, fm.horizontalAdvance(text)) + 20
        x0, y0 = vp.left() + 14, vp.bottom() - 46
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QColor(255, 255, 255, 210))
        painter.drawRoundedRect(QRectF(x0, y0, box_w, 34), 4, 4)
        painter.setPen(QColor(20, 20, 20))
        painter.drawText(QRectF(x0 + 10, y0 + 2, box_w - 20, 16), Qt.AlignmentFlag.AlignLeft, text)
        if bar_px:
            pen = QPen(QColor(20, 20, 20), 3)
            pen.setCapStyle(Qt.PenCapStyle.FlatCap)
            painter.setPen(pen)
            painter.drawLine(QPointF(x0 + 10, y0 + 26), QPointF(x0 + 10 + bar_px, y0 + 26))
        painter.restore()
