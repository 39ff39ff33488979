"""Scene layers; the scene unit is one level-0 pixel."""

from __future__ import annotations

import numpy as np
import shapely
from PySide6.QtCore import QRect, QRectF, Qt
from PySide6.QtGui import QColor, QImage, QPainter, QPainterPath, QPen, QPixmap, QTransform
from PySide6.QtWidgets import (
    QGraphicsEffect,
    QGraphicsItem,
    QGraphicsPathItem,
    QStyleOptionGraphicsItem,
    QWidget,
)
from shapely.geometry.base import BaseGeometry

from inference.geometry import Rect
from inference.heatmap import DEFAULT_COLORMAP, Heatmap
from inference.tiles import ByteLRU, TileGrid, TileKey


def array_to_qimage(arr: np.ndarray) -> QImage:
    """RGB or RGBA uint8 (h, w, c) -> a QImage that owns a copy of the pixels."""
    arr = np.ascontiguousarray(arr)
    h, w, c = arr.shape
    fmt = QImage.Format.Format_RGB888 if c == 3 else QImage.Format.Format_RGBA8888
    return QImage(arr.data, w, h, w * c, fmt).copy()


def qrectf(rect: Rect) -> QRectF:
    return QRectF(rect.x, rect.y, rect.w, rect.h)


def rect_from_qrectf(r: QRectF) -> Rect:
    """Scene (level-0) QRectF -> integer Rect covering it."""
    return Rect.from_corners(np.floor(r.left()), np.floor(r.top()), np.ceil(r.right()), np.ceil(r.bottom()))


class TileLayer(QGraphicsItem):
    """Draws the slide from display tiles: the right level when cached, else a coarser one.

    The coarsest level (a thumbnail, a few tiles at most) is pinned, so the view is never blank.
    """

    def __init__(self, grid: TileGrid, cache_bytes: int = 384 << 20) -> None:
        super().__init__()
        self.grid = grid
        self.cache: ByteLRU[QPixmap] = ByteLRU(cache_bytes, lambda pm: pm.width() * pm.height() * 4)
        self.pinned: dict[TileKey, QPixmap] = {}
        self.request_tile = lambda key: None  # set by the view: queue a tile read
        self._dirty: QRectF | None = None  # level-0 area of the tiles stored since the last flush
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemUsesExtendedStyleOption, True)
        self.setZValue(0)

    def boundingRect(self) -> QRectF:
        return QRectF(0, 0, self.grid.width_l0, self.grid.height_l0)

    def pixmap(self, key: TileKey) -> QPixmap | None:
        return self.pinned.get(key) or self.cache.get(key)

    def add_tile(self, key: TileKey, arr: np.ndarray) -> None:
        """Store a loaded tile (GUI thread); :meth:`flush` repaints it."""
        pm = QPixmap.fromImage(array_to_qimage(arr))
        if key.level == self.grid.coarsest:
            self.pinned[key] = pm
        else:
            self.cache.put(key, pm)
        r = qrectf(self.grid.rect(key))
        self._dirty = r if self._dirty is None else self._dirty.united(r)

    def flush(self) -> None:
        """Repaint the area of the tiles stored since the last flush, once."""
        if self._dirty is not None:
            self.update(self._dirty)
            self._dirty = None

    def coarsest_keys(self) -> list[TileKey]:
        rows, cols = self.grid.shape(self.grid.coarsest)
        return [TileKey(self.grid.slide_id, self.grid.coarsest, r, c) for r in range(rows) for c in range(cols)]

    def missing(self, view_l0: Rect, scale: float) -> list[TileKey]:
        """Tiles at their final resolution for this view that are not cached yet."""
        level = self.grid.level_for_scale(scale)
        return [k for k in self.grid.visible(level, view_l0) if self.pixmap(k) is None]

    def paint(self, painter: QPainter, option: QStyleOptionGraphicsItem, widget: QWidget | None = None) -> None:
        transform = painter.worldTransform()
        scale = transform.m11() * (widget.devicePixelRatioF() if widget is not None else 1.0)
        view_l0 = rect_from_qrectf(option.exposedRect).intersect(
            Rect(0, 0, self.grid.width_l0, self.grid.height_l0)
        )
        if view_l0.is_empty:
            return
        level = self.grid.level_for_scale(scale)
        painter.save()
        painter.resetTransform()
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, abs(transform.m11() - 1) > 1e-3)
        for key in self.grid.visible(level, view_l0):
            pm = self.pixmap(key)
            if pm is not None:
                painter.drawPixmap(self._device_rect(transform, self.grid.rect(key)), pm)
                continue
            self.request_tile(key)
            self._paint_fallback(painter, transform, key)
        painter.restore()

    def _paint_fallback(self, painter: QPainter, transform, key: TileKey) -> None:
        """Draw the part of the nearest cached coarser tile that covers ``key``."""
        target = self.grid.rect(key)
        for up in range(1, self.grid.coarsest - key.level + 1):
            parent = self.grid.parent(key, up)
            pm = self.pixmap(parent)
            if pm is None:
                continue
            prect = self.grid.rect(parent)
            sx = pm.width() / prect.w
            sy = pm.height() / prect.h
            source = QRectF((target.x - prect.x) * sx, (target.y - prect.y) * sy, target.w * sx, target.h * sy)
            painter.drawPixmap(QRectF(self._device_rect(transform, target)), pm, source)
            return

    @staticmethod
    def _device_rect(transform, rect: Rect) -> QRect:
        """Level-0 rect -> device pixels with corners rounded independently (no seams)."""
        x0, y0 = transform.map(float(rect.x), float(rect.y))
        x1, y1 = transform.map(float(rect.right), float(rect.bottom))
        ix0, iy0, ix1, iy1 = round(x0), round(y0), round(x1), round(y1)
        return QRect(ix0, iy0, ix1 - ix0, iy1 - iy0)


def qimage_to_array(img: QImage) -> np.ndarray:
    """QImage -> RGB uint8 (h, w, 3) copy."""
    img = img.convertToFormat(QImage.Format.Format_RGB888)
    w, h, bpl = img.width(), img.height(), img.bytesPerLine()
    buf = np.frombuffer(img.constBits(), np.uint8, count=bpl * h).reshape(h, bpl)
    return buf[:, : w * 3].reshape(h, w, 3).copy()


def adjustment_lut(brightness: float, contrast: float) -> np.ndarray:
    """256-entry uint8 table: (v - 128) * contrast + 128 + brightness * 255, clipped."""
    v = np.arange(256, dtype=np.float64)
    return np.clip((v - 128) * contrast + 128 + brightness * 255, 0, 255).round().astype(np.uint8)


class BrightnessContrastEffect(QGraphicsEffect):
    """Brightness and contrast of the slide as displayed (the tiles' pixels are not changed).

    Disabled at the identity, so unadjusted painting costs nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.brightness, self.contrast = 0.0, 1.0
        self._lut = adjustment_lut(0.0, 1.0)
        self.setEnabled(False)

    def set_values(self, brightness: float, contrast: float) -> None:
        """``brightness`` in [-1, 1] (share of full scale added), ``contrast`` a factor (1 = none)."""
        self.brightness, self.contrast = float(brightness), float(contrast)
        self._lut = adjustment_lut(self.brightness, self.contrast)
        self.setEnabled(not (self.brightness == 0 and self.contrast == 1))
        self.update()

    def draw(self, painter: QPainter) -> None:
        # Render the source into an image of the painted device, adjust it, draw it back.
        # (PySide6's sourcePixmap() drops the offset it would be drawn at, hence drawSource.)
        device = painter.device()
        img = QImage(device.width(), device.height(), QImage.Format.Format_RGBA8888)
        img.fill(Qt.GlobalColor.transparent)
        off = QPainter(img)
        off.setWorldTransform(painter.worldTransform())
        self.drawSource(off)
        off.end()
        w, h, bpl = img.width(), img.height(), img.bytesPerLine()
        arr = np.frombuffer(img.constBits(), np.uint8, count=bpl * h).reshape(h, bpl)[:, : w * 4].reshape(h, w, 4)
        out = arr.copy()
        out[..., :3] = self._lut[arr[..., :3]]
        painter.save()
        painter.setWorldTransform(QTransform())
        painter.drawImage(0, 0, array_to_qimage(out))
        painter.restore()


class HeatmapLayer(QGraphicsItem):
    """The heatmap: one image pixel per cell, scaled onto level 0 without smoothing."""

    def __init__(self, heatmap: Heatmap) -> None:
        super().__init__()
        self.heatmap = heatmap
        self.colormap = DEFAULT_COLORMAP
        self.threshold = 0.0
        self.show_tissue = False
        self._image = QImage()
        self.setZValue(10)
        self.refresh()

    def boundingRect(self) -> QRectF:
        rows, cols = self.heatmap.grid.cell_shape
        x0, y0, x1, y1 = self.heatmap.grid.cell_block_box(0, 0, rows, cols)
        return QRectF(x0, y0, x1 - x0, y1 - y0)

    def refresh(self, block: tuple[int, int, int, int] | None = None) -> None:
        """Rebuild the image after new cells (GUI thread); repaint only ``block`` if given."""
        rgba = self.heatmap.to_rgba(self.colormap, self.threshold)
        if self.show_tissue:
            pending = self.heatmap.tissue_cells & ~self.heatmap.computed
            rgba[pending] = (60, 140, 255, 110)
        self._image = array_to_qimage(rgba)
        if block is None:
            self.update()
        else:
            x0, y0, x1, y1 = self.heatmap.grid.cell_block_box(*block)
            self.update(QRectF(x0, y0, x1 - x0, y1 - y0))

    def paint(self, painter: QPainter, option: QStyleOptionGraphicsItem, widget: QWidget | None = None) -> None:
        if self._image.isNull():
            return
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, False)
        painter.drawImage(self.boundingRect(), self._image, QRectF(self._image.rect()))


def geometry_path(geom: BaseGeometry) -> QPainterPath:
    """A QPainterPath of polygons (with holes) and lines; points are drawn by the item."""
    path = QPainterPath()
    path.setFillRule(Qt.FillRule.OddEvenFill)
    for part in getattr(geom, "geoms", [geom]):
        if part.geom_type == "Polygon":
            for ring in [part.exterior, *part.interiors]:
                pts = list(ring.coords)
                path.moveTo(*pts[0])
                for x, y in pts[1:]:
                    path.lineTo(x, y)
                path.closeSubpath()
        elif part.geom_type == "LineString":
            pts = list(part.coords)
            path.moveTo(*pts[0])
            for x, y in pts[1:]:
                path.lineTo(x, y)
    return path


class OutlineLayer(QGraphicsPathItem):
    """Outlines of level-0 regions (e.g. the pathologist's IDC patches), merged."""

    def __init__(self, regions: list[BaseGeometry], colour: QColor) -> None:
        super().__init__()
        union = shapely.union_all(regions)
        self.setPath(geometry_path(union))
        pen = QPen(colour, 2.5)
        pen.setCosmetic(True)  # constant screen width at every zoom
        self.setPen(pen)
        self.setZValue(20)
