"""Annotation items in the scene (level-0 pixels), kept in sync with an AnnotationStore."""

from __future__ import annotations

import shapely
import shapely.affinity
from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QBrush, QColor, QPainter, QPainterPath, QPen
from PySide6.QtWidgets import (
    QGraphicsItem,
    QGraphicsPathItem,
    QGraphicsRectItem,
    QGraphicsScene,
    QGraphicsSceneMouseEvent,
    QStyleOptionGraphicsItem,
    QWidget,
)

from inference.annotations import Annotation, AnnotationStore
from viewer.layers import geometry_path

POINT_RADIUS_PX = 6


class VertexHandle(QGraphicsRectItem):
    """A draggable square of constant screen size on one polygon vertex."""

    def __init__(self, owner: AnnotationItem, ring: int, index: int, pos: QPointF) -> None:
        super().__init__(-5, -5, 10, 10, owner)
        self.owner, self.ring, self.index = owner, ring, index
        self.setPos(pos)
        self.setBrush(QColor(255, 255, 255))
        self.setPen(QPen(QColor(20, 20, 20), 1))
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIgnoresTransformations, True)
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIsMovable, True)
        self.setCursor(Qt.CursorShape.SizeAllCursor)
        self.setZValue(100)

    def mouseReleaseEvent(self, event: QGraphicsSceneMouseEvent) -> None:
        super().mouseReleaseEvent(event)
        self.owner.vertex_moved(self.ring, self.index, self.pos())


class AnnotationItem(QGraphicsPathItem):
    """One annotation; moving it or its vertices commits one undoable edit to the store."""

    def __init__(self, annotation: Annotation, store: AnnotationStore) -> None:
        super().__init__(geometry_path(annotation.geometry))
        self.annotation, self.store = annotation, store
        color = QColor(*store.color(annotation.cls))
        pen = QPen(color, 2.5 if annotation.source == "manual" else 2.0)
        pen.setCosmetic(True)
        if annotation.source == "model":
            pen.setStyle(Qt.PenStyle.DashLine)
        self.setPen(pen)
        fill = QColor(color)
        fill.setAlpha(40)
        self.setBrush(QBrush(fill))
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIsSelectable, True)
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIsMovable, False)
        self.setZValue(30)
        self.setToolTip(f"{annotation.cls}: {annotation.name}" if annotation.name else annotation.cls)
        self._handles: list[VertexHandle] = []
        self._is_point = annotation.geometry.geom_type in ("Point", "MultiPoint")
        self.fill = True

    def _point_rect(self) -> QRectF:
        """Bounds of a point marker: constant screen size, so padded by the view's scale."""
        minx, miny, maxx, maxy = self.annotation.geometry.bounds
        pad = (POINT_RADIUS_PX + 3) / self._scene_scale()
        return QRectF(minx - pad, miny - pad, maxx - minx + 2 * pad, maxy - miny + 2 * pad)

    def boundingRect(self) -> QRectF:
        return self._point_rect() if self._is_point else super().boundingRect()

    def shape(self) -> QPainterPath:
        if self._is_point:
            p = QPainterPath()
            p.addRect(self._point_rect())
            return p
        return super().shape()

    def _scene_scale(self) -> float:
        views = self.scene().views() if self.scene() is not None else []
        return views[0].transform().m11() if views else 1.0

    def paint(self, painter: QPainter, option: QStyleOptionGraphicsItem, widget: QWidget | None = None) -> None:
        selected = self.isSelected()
        if selected:
            pen = QPen(self.pen())
            pen.setWidthF(pen.widthF() + 1.5)
            pen.setColor(QColor(255, 220, 0))
            painter.setPen(pen)
        else:
            painter.setPen(self.pen())
        if not self._is_point:  # a dark halo keeps the outline visible on any heatmap colour
            halo = QPen(QColor(0, 0, 0, 170), painter.pen().widthF() + 2.5)
            halo.setCosmetic(True)
            halo.setJoinStyle(Qt.PenJoinStyle.RoundJoin)
            painter.save()
            painter.setPen(halo)
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawPath(self.path())
            painter.restore()
        if self._is_point:
            r = POINT_RADIUS_PX / max(painter.worldTransform().m11(), 1e-9)
            painter.setBrush(self.pen().color())
            for part in getattr(self.annotation.geometry, "geoms", [self.annotation.geometry]):
                painter.drawEllipse(QPointF(part.x, part.y), r, r)
            return
        painter.setBrush(self.brush() if self.fill else Qt.BrushStyle.NoBrush)
        painter.drawPath(self.path())

    # -- editing ----------------------------------------------------------------------------
    def set_editable(self, editable: bool) -> None:
        """Movable with vertex handles (select tool) or not."""
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIsMovable, editable)
        for h in self._handles:
            if h.scene() is not None:
                h.scene().removeItem(h)
        self._handles = []
        geom = self.annotation.geometry
        if editable and self.isSelected() and geom.geom_type == "Polygon" and len(geom.exterior.coords) <= 400:
            for ring_i, ring in enumerate([geom.exterior, *geom.interiors]):
                for k, (x, y) in enumerate(list(ring.coords)[:-1]):
                    self._handles.append(VertexHandle(self, ring_i, k, QPointF(x, y)))

    def vertex_moved(self, ring: int, index: int, pos: QPointF) -> None:
        geom = self.annotation.geometry
        rings = [list(geom.exterior.coords)[:-1]] + [list(r.coords)[:-1] for r in geom.interiors]
        rings[ring][index] = (pos.x(), pos.y())
        new = shapely.Polygon(rings[0], rings[1:])
        if not new.is_valid:
            new = shapely.make_valid(new)
        self.store.update(self.annotation.id, geometry=new)

    def mouseReleaseEvent(self, event: QGraphicsSceneMouseEvent) -> None:
        super().mouseReleaseEvent(event)
        offset = self.pos()
        if offset.x() or offset.y():
            moved = shapely.affinity.translate(self.annotation.geometry, offset.x(), offset.y())
            self.store.update(self.annotation.id, geometry=moved)


class AnnotationLayer:
    """Keeps one AnnotationItem per stored annotation, rebuilding only what changed."""

    def __init__(self, scene: QGraphicsScene, store: AnnotationStore) -> None:
        self.scene, self.store = scene, store
        self.items: dict[str, AnnotationItem] = {}
        self.editable = False
        self.visible_classes: set[str] | None = None
        self.shown = True  # View > Show annotations
        self.fill = True  # View > Fill annotations
        store.subscribe(self.sync)
        self.sync()

    def sync(self) -> None:
        current = {a.id: a for a in self.store.items}
        selected = {i for i, it in self.items.items() if it.isSelected()}
        for ann_id in list(self.items):
            item = self.items[ann_id]
            if ann_id not in current or current[ann_id] is not item.annotation:
                self.scene.removeItem(item)
                del self.items[ann_id]
        for ann_id, a in current.items():
            if ann_id not in self.items:
                item = AnnotationItem(a, self.store)
                self.scene.addItem(item)
                self.items[ann_id] = item
                item.setSelected(ann_id in selected)
                item.fill = self.fill
                item.setVisible(self._visible(a.cls))
                item.set_editable(self.editable)

    def _visible(self, cls: str) -> bool:
        return self.shown and (self.visible_classes is None or cls in self.visible_classes)

    def set_shown(self, shown: bool) -> None:
        """Show or hide every annotation (the class filter still applies when shown)."""
        self.shown = shown
        for item in self.items.values():
            item.setVisible(self._visible(item.annotation.cls))

    def set_fill(self, fill: bool) -> None:
        self.fill = fill
        for item in self.items.values():
            item.fill = fill
            item.update()

    def set_editable(self, editable: bool) -> None:
        self.editable = editable
        for item in self.items.values():
            item.set_editable(editable)

    def set_visible_classes(self, classes: set[str] | None) -> None:
        self.visible_classes = classes
        for item in self.items.values():
            item.setVisible(self._visible(item.annotation.cls))

    def selected_ids(self) -> list[str]:
        return [i for i, it in self.items.items() if it.isSelected()]

    def select(self, ids: list[str]) -> None:
        for i, it in self.items.items():
            it.setSelected(i in ids)

    def detach(self) -> None:
        self.store.unsubscribe(self.sync)
        for item in self.items.values():
            self.scene.removeItem(item)
        self.items.clear()
