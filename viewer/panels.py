"""Side panels and small dialogs: overview (minimap), slide metadata, brightness/contrast, shortcuts."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import (
    QAction,
    QColor,
    QKeySequence,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QPen,
    QPixmap,
)
from PySide6.QtWidgets import (
    QDialog,
    QFormLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from inference.geometry import Rect
from inference.slide import Slide
from viewer.layers import array_to_qimage


class OverviewPanel(QWidget):
    """Whole-slide thumbnail with the viewport rectangle; click or drag to navigate."""

    navigate_requested = Signal(float, float)  # level-0 px to centre on

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumSize(QSize(200, 150))
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setCursor(Qt.CursorShape.PointingHandCursor)
        self._pixmap: QPixmap | None = None
        self._size_l0: tuple[int, int] = (1, 1)
        self._view_l0: Rect | None = None

    def set_thumbnail(self, size_l0: tuple[int, int], thumb: np.ndarray | None) -> None:
        self._size_l0 = size_l0
        self._pixmap = QPixmap.fromImage(array_to_qimage(thumb)) if thumb is not None else None
        self.update()

    def set_view(self, view_l0: Rect) -> None:
        self._view_l0 = view_l0
        self.update()

    def heightForWidth(self, w: int) -> int:
        sw, sh = self._size_l0
        return max(100, int(w * sh / sw))

    def _image_rect(self) -> QRectF:
        sw, sh = self._size_l0
        s = min((self.width() - 8) / sw, (self.height() - 8) / sh)
        w, h = sw * s, sh * s
        return QRectF((self.width() - w) / 2, (self.height() - h) / 2, w, h)

    def paintEvent(self, event: QPaintEvent) -> None:
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(250, 250, 250))
        if self._pixmap is None:
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "No slide")
            return
        r = self._image_rect()
        p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        p.drawPixmap(r, self._pixmap, QRectF(self._pixmap.rect()))
        if self._view_l0 is not None:
            s = r.width() / self._size_l0[0]
            v = self._view_l0
            vr = QRectF(r.x() + v.x * s, r.y() + v.y * s, v.w * s, v.h * s).intersected(r)
            p.setPen(QPen(QColor(220, 30, 30), 2))
            p.setBrush(Qt.BrushStyle.NoBrush)
            p.drawRect(vr)

    def _navigate(self, pos: QPointF) -> None:
        r = self._image_rect()
        if r.width() <= 0:
            return
        s = self._size_l0[0] / r.width()
        x = min(max(pos.x() - r.x(), 0), r.width()) * s
        y = min(max(pos.y() - r.y(), 0), r.height()) * s
        self.navigate_requested.emit(x, y)

    def mousePressEvent(self, event: QMouseEvent) -> None:
        if event.button() == Qt.MouseButton.LeftButton:
            self._navigate(event.position())

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        if event.buttons() & Qt.MouseButton.LeftButton:
            self._navigate(event.position())


def describe(slide: Slide) -> list[tuple[str, str]]:
    """Key facts of a slide for display, in order."""
    info = slide.info
    w, h = info.dimensions
    mpp = f"{info.mpp:.4g} \u00b5m/px" + ("" if info.mpp_from_file else " (entered by user)") if info.mpp else "unknown"
    rows = [
        ("File", info.path.name),
        ("Vendor", info.vendor),
        ("Size (level 0)", f"{w:,} x {h:,} px"),
        ("Levels", str(len(info.level_dimensions))),
        ("Downsamples", ", ".join(f"{d:.4g}" for d in info.level_downsamples)),
        ("Level sizes", "; ".join(f"{a} x {b}" for a, b in info.level_dimensions)),
        ("Resolution (MPP)", mpp),
        ("Objective", f"{info.objective_power:g}x" if info.objective_power else "unknown"),
    ]
    if info.mpp:
        rows.append(("Physical size", f"{w * info.mpp / 1000:.2f} x {h * info.mpp / 1000:.2f} mm"))
    rows.append(("Associated images", ", ".join(info.associated) or "none"))
    return rows


class MetadataPanel(QWidget):
    """Vendor, size, levels, MPP, objective, associated images, all properties."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        self.tabs = QTabWidget()
        layout.addWidget(self.tabs)
        self.summary = self._table()
        self.properties = self._table()
        self.images = QWidget()
        self.images_layout = QVBoxLayout(self.images)
        self.tabs.addTab(self.summary, "Summary")
        self.tabs.addTab(self.images, "Label && macro")
        self.tabs.addTab(self.properties, "Properties")

    @staticmethod
    def _table() -> QTableWidget:
        t = QTableWidget(0, 2)
        t.setHorizontalHeaderLabels(["Field", "Value"])
        t.verticalHeader().setVisible(False)
        t.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        t.horizontalHeader().setStretchLastSection(True)
        t.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        t.setWordWrap(True)
        return t

    @staticmethod
    def _fill(table: QTableWidget, rows: list[tuple[str, str]]) -> None:
        table.setRowCount(len(rows))
        for i, (k, v) in enumerate(rows):
            table.setItem(i, 0, QTableWidgetItem(k))
            table.setItem(i, 1, QTableWidgetItem(v))

    def set_slide(self, slide: Slide | None) -> None:
        while self.images_layout.count():
            item = self.images_layout.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        if slide is None:
            self._fill(self.summary, [])
            self._fill(self.properties, [])
            return
        self._fill(self.summary, describe(slide))
        self._fill(self.properties, sorted(slide.info.properties.items()))
        shown = 0
        for name in ("label", "macro", "thumbnail"):
            if name not in slide.info.associated:
                continue
            try:
                arr = slide.associated_image(name)
            except Exception:  # an unreadable associated image is not fatal
                continue
            title = QLabel(f"<b>{name.capitalize()}</b>")
            pic = QLabel()
            pm = QPixmap.fromImage(array_to_qimage(arr))
            pic.setPixmap(pm.scaled(260, 200, Qt.AspectRatioMode.KeepAspectRatio,
                                    Qt.TransformationMode.SmoothTransformation))
            self.images_layout.addWidget(title)
            self.images_layout.addWidget(pic)
            shown += 1
        if not shown:
            self.images_layout.addWidget(QLabel("This slide has no label or macro image."))
        self.images_layout.addStretch(1)


class AdjustDialog(QDialog):
    """Brightness and contrast of the slide as shown (not of the pixels the model reads)."""

    changed = Signal(float, float)  # brightness in [-1, 1], contrast factor

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Brightness and contrast")
        form = QFormLayout(self)
        self.brightness = QSlider(Qt.Orientation.Horizontal)
        self.brightness.setRange(-50, 50)
        self.contrast = QSlider(Qt.Orientation.Horizontal)
        self.contrast.setRange(25, 300)  # percent
        self.contrast.setValue(100)
        for slider in (self.brightness, self.contrast):
            slider.valueChanged.connect(self._on_slider_changed)
        form.addRow("Brightness", self.brightness)
        form.addRow("Contrast", self.contrast)
        self.note = QLabel("Display only: the heatmap and exports use the slide's own pixels.")
        self.note.setWordWrap(True)
        form.addRow(self.note)
        reset = QPushButton("Reset")
        reset.clicked.connect(self.reset)
        form.addRow(reset)

    def reset(self) -> None:
        self.brightness.setValue(0)
        self.contrast.setValue(100)

    def values(self) -> tuple[float, float]:
        return self.brightness.value() / 100, self.contrast.value() / 100

    def _on_slider_changed(self, _value: int) -> None:
        self.changed.emit(*self.values())


def shortcut_rows(actions: list[QAction]) -> list[tuple[str, str]]:
    """(shortcut, what it does) for every action that has a shortcut, sorted by what it does."""
    rows = {}
    for act in actions:
        keys = ", ".join(k.toString(QKeySequence.SequenceFormat.NativeText) for k in act.shortcuts())
        if keys:
            rows[act.text().replace("&", "").rstrip("\u2026")] = keys
    return sorted(((k, t) for t, k in rows.items()), key=lambda r: r[1].lower())


class ShortcutsDialog(QDialog):
    """Help > Keyboard shortcuts: every shortcut of the window, plus the mouse."""

    MOUSE = [("Wheel", "Zoom about the cursor"), ("Drag (Move tool)", "Pan"),
             ("Double-click (Polygon tool)", "Close the polygon"), ("Escape", "Cancel the drawing")]

    def __init__(self, actions: list[QAction], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Keyboard shortcuts")
        layout = QVBoxLayout(self)
        rows = shortcut_rows(actions) + self.MOUSE
        self.table = QTableWidget(len(rows), 2)
        self.table.setHorizontalHeaderLabels(["Keys", "Action"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        for r, (keys, text) in enumerate(rows):
            self.table.setItem(r, 0, QTableWidgetItem(keys))
            self.table.setItem(r, 1, QTableWidgetItem(text))
        self.table.resizeColumnToContents(0)
        layout.addWidget(self.table)
        self.resize(520, 560)
