"""Drawing tools: turn mouse input in the slide view into shapely geometry (level-0 pixels)."""

from __future__ import annotations

from collections.abc import Callable

import shapely
from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QColor, QFont, QPainterPath, QPen
from PySide6.QtWidgets import (
    QGraphicsItem,
    QGraphicsPathItem,
    QGraphicsScene,
    QGraphicsSimpleTextItem,
)
from shapely.geometry.base import BaseGeometry

from viewer.layers import geometry_path

#: Tool name -> shortcut, close to QuPath's where it has one.
TOOLS = {
    "pan": ("Move / pan", "M"),
    "select": ("Select and edit", "S"),
    "rectangle": ("Rectangle", "R"),
    "polygon": ("Polygon (click points, double-click or Enter to close)", "P"),
    "freehand": ("Freehand lasso", "F"),
    "brush": ("Brush (adds to the selected region)", "B"),
    "point": ("Point", "."),
    "ruler": ("Ruler (drag to measure a distance; nothing is stored)", "L"),
}

Finish = Callable[[BaseGeometry], None]


class Tool:
    """Base class: subclasses build ``geometry`` and call ``finish`` when it is complete."""

    def __init__(self, scene: QGraphicsScene, finish: Finish, scale: Callable[[], float]) -> None:
        self.scene, self.finish, self.scale = scene, finish, scale
        self.points: list[tuple[float, float]] = []
        self.preview = QGraphicsPathItem()
        pen = QPen(QColor(255, 200, 0), 2, Qt.PenStyle.DashLine)
        pen.setCosmetic(True)
        self.preview.setPen(pen)
        self.preview.setZValue(90)
        scene.addItem(self.preview)

    def press(self, p: QPointF) -> None: ...

    def move(self, p: QPointF, pressed: bool) -> None: ...

    def release(self, p: QPointF) -> None: ...

    def double_click(self, p: QPointF) -> None: ...

    def key(self, key: int) -> bool:
        """Handle a key; True if used. Escape cancels any tool."""
        if key == Qt.Key.Key_Escape:
            self.cancel()
            return True
        return False

    def cancel(self) -> None:
        self.points = []
        self.preview.setPath(QPainterPath())

    def close(self) -> None:
        self.cancel()
        if self.preview.scene() is not None:
            self.scene.removeItem(self.preview)

    def _show(self, pts: list[tuple[float, float]], closed: bool = False) -> None:
        path = QPainterPath()
        if pts:
            path.moveTo(*pts[0])
            for x, y in pts[1:]:
                path.lineTo(x, y)
            if closed:
                path.closeSubpath()
        self.preview.setPath(path)

    def _done(self, geom: BaseGeometry | None) -> None:
        self.cancel()
        if geom is not None and not geom.is_empty:
            self.finish(geom)


class RectangleTool(Tool):
    def press(self, p: QPointF) -> None:
        self.points = [(p.x(), p.y())]

    def move(self, p: QPointF, pressed: bool) -> None:
        if pressed and self.points:
            (x0, y0), x1, y1 = self.points[0], p.x(), p.y()
            self._show([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], closed=True)

    def release(self, p: QPointF) -> None:
        if not self.points:
            return
        (x0, y0), x1, y1 = self.points[0], p.x(), p.y()
        min_side = 3 / self.scale()  # ignore clicks: a rectangle needs a few screen pixels
        geom = shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        self._done(geom if abs(x1 - x0) > min_side and abs(y1 - y0) > min_side else None)


def _polygon(points: list[tuple[float, float]]) -> BaseGeometry | None:
    if len(points) < 3:
        return None
    poly = shapely.Polygon(points)
    if not poly.is_valid:
        poly = shapely.make_valid(poly)
        parts = [g for g in getattr(poly, "geoms", [poly]) if g.geom_type in ("Polygon", "MultiPolygon")]
        poly = shapely.union_all(parts) if parts else None
    return poly if poly is not None and poly.area > 0 else None


class PolygonTool(Tool):
    """Click to add vertices; double-click or Enter closes. Press-drag-release draws freehand."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self._dragging = False
        self._hover: tuple[float, float] | None = None

    def press(self, p: QPointF) -> None:
        self.points.append((p.x(), p.y()))
        self._dragging = len(self.points) == 1
        self._show(self.points)

    def move(self, p: QPointF, pressed: bool) -> None:
        if pressed and self._dragging:
            last = self.points[-1]
            if (p.x() - last[0]) ** 2 + (p.y() - last[1]) ** 2 > (2 / self.scale()) ** 2:
                self.points.append((p.x(), p.y()))
            self._show(self.points)
        elif self.points:
            self._show([*self.points, (p.x(), p.y())])

    def release(self, p: QPointF) -> None:
        if self._dragging and len(self.points) > 8:  # a freehand stroke
            self._done(_polygon(self.points))
        self._dragging = False

    def double_click(self, p: QPointF) -> None:
        self._done(_polygon(self.points))

    def key(self, key: int) -> bool:
        if key in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            self._done(_polygon(self.points))
            return True
        if key == Qt.Key.Key_Backspace and self.points:
            self.points.pop()
            self._show(self.points)
            return True
        return super().key(key)


class FreehandTool(Tool):
    """Lasso: press, drag around the region, release."""

    def press(self, p: QPointF) -> None:
        self.points = [(p.x(), p.y())]

    def move(self, p: QPointF, pressed: bool) -> None:
        if pressed and self.points:
            self.points.append((p.x(), p.y()))
            self._show(self.points, closed=True)

    def release(self, p: QPointF) -> None:
        geom = _polygon(self.points)
        if geom is not None:
            geom = geom.simplify(0.5 / self.scale())
        self._done(geom)


class BrushTool(Tool):
    """Paint a stroke of constant screen width; the stroke becomes a polygon."""

    radius_px = 12

    def press(self, p: QPointF) -> None:
        self.points = [(p.x(), p.y())]
        self._paint()

    def move(self, p: QPointF, pressed: bool) -> None:
        if pressed and self.points:
            self.points.append((p.x(), p.y()))
            self._paint()

    def _stroke(self) -> BaseGeometry:
        r = self.radius_px / self.scale()
        line = shapely.Point(self.points[0]) if len(self.points) == 1 else shapely.LineString(self.points)
        return line.buffer(r, quad_segs=6)

    def _paint(self) -> None:
        self.preview.setPath(geometry_path(self._stroke()))

    def release(self, p: QPointF) -> None:
        if self.points:
            self._done(self._stroke().simplify(0.5 / self.scale()))


class PointTool(Tool):
    def release(self, p: QPointF) -> None:
        self._done(shapely.Point(p.x(), p.y()))


def distance_text(length_l0: float, mpp: float | None) -> str:
    """A measured distance in micrometres (or pixels when the resolution is unknown)."""
    if mpp is None:
        return f"{length_l0:,.0f} px (resolution unknown)"
    um = length_l0 * mpp
    return f"{um / 1000:,.2f} mm" if um >= 10_000 else f"{um:,.1f} \u00b5m"


class RulerTool(Tool):
    """Press, drag, release: the line and its length stay on screen until the next measurement."""

    mpp: Callable[[], float | None] = staticmethod(lambda: None)  # set by the view

    def __init__(self, scene: QGraphicsScene, finish: Finish, scale: Callable[[], float]) -> None:
        super().__init__(scene, finish, scale)
        self.label = QGraphicsSimpleTextItem()
        self.label.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIgnoresTransformations, True)
        self.label.setBrush(QColor(255, 230, 0))
        self.label.setPen(QPen(QColor(0, 0, 0), 0.6))
        font = QFont()
        font.setPointSize(12)
        font.setBold(True)
        self.label.setFont(font)
        self.label.setZValue(91)
        scene.addItem(self.label)
        self.line: shapely.LineString | None = None

    def press(self, p: QPointF) -> None:
        self.points = [(p.x(), p.y())]

    def move(self, p: QPointF, pressed: bool) -> None:
        if pressed and self.points:
            self._measure([self.points[0], (p.x(), p.y())])

    def release(self, p: QPointF) -> None:
        if not self.points:
            return
        pts = [self.points[0], (p.x(), p.y())]
        self.points = []
        if shapely.LineString(pts).length * self.scale() < 3:  # a click, not a measurement
            return
        self._measure(pts)
        self.finish(self.line)

    def _measure(self, pts: list[tuple[float, float]]) -> None:
        self.line = shapely.LineString(pts)
        self._show(pts)
        self.label.setText(distance_text(self.line.length, self.mpp()))
        self.label.setPos(*pts[-1])

    def cancel(self) -> None:
        super().cancel()
        self.line = None
        if self.label.scene() is not None:
            self.label.setText("")

    def close(self) -> None:
        super().close()
        if self.label.scene() is not None:
            self.scene.removeItem(self.label)


TOOL_CLASSES: dict[str, type[Tool]] = {
    "rectangle": RectangleTool,
    "polygon": PolygonTool,
    "freehand": FreehandTool,
    "brush": BrushTool,
    "point": PointTool,
    "ruler": RulerTool,
}
