"""Annotation panel: class palette, the list of annotations, heatmap-to-regions."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QColor, QIcon, QPixmap
from PySide6.QtWidgets import (
    QCheckBox,
    QColorDialog,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from inference.annotations import AnnotationStore, regions_from_heatmap
from inference.heatmap import Heatmap

ALL = "All classes"


def swatch(color: tuple[int, int, int]) -> QIcon:
    pm = QPixmap(14, 14)
    pm.fill(QColor(*color))
    return QIcon(pm)


class AnnotationPanel(QWidget):
    """Lists a slide's annotations; the palette sets the class of new and selected ones."""

    go_to = Signal(str)  # annotation id to centre on
    selection_changed = Signal(list)  # ids selected in the list
    visible_classes_changed = Signal(object)  # set of class names, or None for all

    def __init__(self) -> None:
        super().__init__()
        self.store: AnnotationStore | None = None
        self.mpp: float | None = None
        self.heatmap: Heatmap | None = None
        self._syncing = False
        layout = QVBoxLayout(self)

        palette = QHBoxLayout()
        self.class_combo = QComboBox()
        self.class_combo.setToolTip("Class of new annotations")
        palette.addWidget(self.class_combo, 1)
        self.apply_button = QPushButton("Set class")
        self.apply_button.setToolTip("Give the selected annotations this class")
        self.apply_button.clicked.connect(self._on_apply_clicked)
        palette.addWidget(self.apply_button)
        self.add_class_button = QPushButton("New class\u2026")
        self.add_class_button.clicked.connect(self._on_add_class_clicked)
        palette.addWidget(self.add_class_button)
        layout.addLayout(palette)

        self.filter_combo = QComboBox()
        self.filter_combo.currentTextChanged.connect(self._on_filter_changed)
        layout.addWidget(self.filter_combo)
        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["Name", "Class", "\u00b5m\u00b2", "P(IDC)", "Source"])
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for col in range(1, 5):  # the figures were hidden behind a scroll bar
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QTableWidget.EditTrigger.DoubleClicked)
        self.table.itemSelectionChanged.connect(self._on_table_selection_changed)
        self.table.cellClicked.connect(self._on_table_cell_clicked)
        self.table.itemChanged.connect(self._on_table_item_changed)
        layout.addWidget(self.table, 1)

        self.note_edit = QLineEdit()
        self.note_edit.setPlaceholderText("Note for the selected annotation (Enter to save)")
        self.note_edit.returnPressed.connect(self._on_note_entered)
        layout.addWidget(self.note_edit)

        box = QGroupBox("Regions from the heatmap")
        form = QFormLayout(box)
        self.region_calls = QCheckBox("The model's calls on this slide")
        self.region_calls.setToolTip("The cells the model calls IDC, as the cohort figures, the report and the "
                                     "worklist count them (none on a slide it calls free of IDC). Untick to "
                                     "choose a probability yourself.")
        self.region_calls.setChecked(True)
        form.addRow(self.region_calls)
        self.region_threshold = QDoubleSpinBox()
        self.region_threshold.setRange(0.0, 1.0)
        self.region_threshold.setSingleStep(0.05)
        self.region_threshold.setValue(0.5)
        self.region_threshold.setEnabled(False)
        self.region_calls.toggled.connect(self._on_region_calls_toggled)
        form.addRow("P(IDC) \u2265", self.region_threshold)
        self.region_min_area = QDoubleSpinBox()
        self.region_min_area.setRange(0.0, 1e6)
        self.region_min_area.setDecimals(3)
        self.region_min_area.setValue(0.1)
        self.region_min_area.setSuffix(" mm\u00b2")
        form.addRow("Minimum area", self.region_min_area)
        self.regions_button = QPushButton("Create IDC regions")
        self.regions_button.clicked.connect(self.create_regions)
        form.addRow(self.regions_button)
        self.confirm_button = QPushButton("Confirm selected model regions")
        self.confirm_button.setToolTip("Model regions are not ground truth for training until a person "
                                       "confirms or edits them")
        self.confirm_button.clicked.connect(self._on_confirm_clicked)
        form.addRow(self.confirm_button)
        layout.addWidget(box)

        export_row = QHBoxLayout()
        self.export_bar = QProgressBar()
        self.export_bar.setFormat("Exporting crops: %v / %m regions")
        self.export_cancel = QPushButton("Cancel export")
        export_row.addWidget(self.export_bar, 1)
        export_row.addWidget(self.export_cancel)
        layout.addLayout(export_row)
        self.show_export(None)
        self._refresh_classes()

    def show_export(self, progress: tuple[int, int] | None) -> None:
        """Show (done, total) of a running crop export, or hide the row (None)."""
        for w in (self.export_bar, self.export_cancel):
            w.setVisible(progress is not None)
        if progress is not None:
            self.export_bar.setRange(0, max(1, progress[1]))
            self.export_bar.setValue(progress[0])

    # -- models -----------------------------------------------------------------------------
    def set_store(self, store: AnnotationStore | None, mpp: float | None) -> None:
        if self.store is not None:
            self.store.unsubscribe(self.refresh)
        self.store, self.mpp = store, mpp
        if store is not None:
            store.subscribe(self.refresh)
        self._refresh_classes()
        self.refresh()

    def set_heatmap(self, heatmap: Heatmap | None) -> None:
        self.heatmap = heatmap
        if heatmap is not None:
            self.region_threshold.setValue(heatmap.threshold)
        self.regions_button.setEnabled(heatmap is not None)
        self.refresh()

    def current_class(self) -> str:
        return self.class_combo.currentText() or "IDC"

    # -- display ----------------------------------------------------------------------------
    def _refresh_classes(self) -> None:
        classes = self.store.classes if self.store is not None else []
        current, filt = self.class_combo.currentText(), self.filter_combo.currentText()
        self.class_combo.blockSignals(True)
        self.filter_combo.blockSignals(True)
        self.class_combo.clear()
        self.filter_combo.clear()
        self.filter_combo.addItem(ALL)
        for c in classes:
            self.class_combo.addItem(swatch(c.color), c.name)
            self.filter_combo.addItem(swatch(c.color), c.name)
        if current:
            self.class_combo.setCurrentText(current)
        if filt:
            self.filter_combo.setCurrentText(filt)
        self.class_combo.blockSignals(False)
        self.filter_combo.blockSignals(False)

    @Slot()
    def refresh(self) -> None:
        """Rebuild the list from the store."""
        self._syncing = True
        if self.store is not None and self.class_combo.count() != len(self.store.classes):
            self._refresh_classes()
        items = self.store.items if self.store is not None else ()
        filt = self.filter_combo.currentText()
        shown = [a for a in items if filt in ("", ALL) or a.cls == filt]
        self.table.setRowCount(len(shown))
        for row, a in enumerate(shown):
            area = a.area_um2(self.mpp)
            mean, _frac = a.heatmap_stats(self.heatmap)
            cells = [a.name or "(unnamed)", a.cls, "\u2014" if area is None else f"{area:,.0f}",
                     "\u2014" if mean is None else f"{mean:.2f}", a.source]
            for col, text in enumerate(cells):
                it = QTableWidgetItem(text)
                it.setData(Qt.ItemDataRole.UserRole, a.id)
                if col != 0:
                    it.setFlags(it.flags() & ~Qt.ItemFlag.ItemIsEditable)
                if col == 1 and self.store is not None:
                    it.setIcon(swatch(self.store.color(a.cls)))
                self.table.setItem(row, col, it)
        self._syncing = False

    def select_ids(self, ids: list[str]) -> None:
        """Mirror a selection made in the view."""
        self._syncing = True
        self.table.clearSelection()
        for row in range(self.table.rowCount()):
            if self.table.item(row, 0).data(Qt.ItemDataRole.UserRole) in ids:
                self.table.selectRow(row)
        self._syncing = False
        self._show_note(ids)

    def _show_note(self, ids: list[str]) -> None:
        a = self.store.get(ids[0]) if self.store is not None and len(ids) == 1 else None
        self.note_edit.setEnabled(a is not None)
        self.note_edit.setText(a.note if a is not None else "")

    def selected_ids(self) -> list[str]:
        rows = sorted({i.row() for i in self.table.selectedItems()})
        return [self.table.item(r, 0).data(Qt.ItemDataRole.UserRole) for r in rows]

    # -- slots ------------------------------------------------------------------------------
    @Slot()
    def _on_table_selection_changed(self) -> None:
        if not self._syncing:
            ids = self.selected_ids()
            self._show_note(ids)
            self.selection_changed.emit(ids)

    @Slot(int, int)
    def _on_table_cell_clicked(self, row: int, _col: int) -> None:
        self.go_to.emit(self.table.item(row, 0).data(Qt.ItemDataRole.UserRole))

    @Slot(QTableWidgetItem)
    def _on_table_item_changed(self, item: QTableWidgetItem) -> None:
        if self._syncing or item.column() != 0 or self.store is None:
            return
        ann_id = item.data(Qt.ItemDataRole.UserRole)
        a = self.store.get(ann_id)
        if a is not None and item.text() != (a.name or "(unnamed)"):
            self.store.update(ann_id, name=item.text())

    @Slot()
    def _on_note_entered(self) -> None:
        ids = self.selected_ids()
        if self.store is not None and len(ids) == 1:
            self.store.update(ids[0], note=self.note_edit.text())

    @Slot()
    def _on_apply_clicked(self) -> None:
        if self.store is None:
            return
        for ann_id in self.selected_ids():
            self.store.update(ann_id, cls=self.current_class())

    @Slot()
    def _on_confirm_clicked(self) -> None:
        if self.store is not None:
            self.store.confirm(*self.selected_ids())

    @Slot()
    def _on_add_class_clicked(self) -> None:
        if self.store is None:
            return
        name, ok = QInputDialog.getText(self, "New class", "Class name:")
        if not ok or not name.strip():
            return
        color = QColorDialog.getColor(QColor(255, 160, 0), self, f"Colour of {name.strip()}")
        self.store.ensure_class(name.strip(), (color.red(), color.green(), color.blue()) if color.isValid() else None)
        self._refresh_classes()
        self.class_combo.setCurrentText(name.strip())

    @Slot(str)
    def _on_filter_changed(self, text: str) -> None:
        self.refresh()
        self.visible_classes_changed.emit(None if text in ("", ALL) else {text})

    @Slot(bool)
    def _on_region_calls_toggled(self, on: bool) -> None:
        self.region_threshold.setEnabled(not on)

    @Slot()
    def create_regions(self) -> None:
        """The model's calls (or the cells at a chosen probability) as editable IDC polygons (one undo step)."""
        if self.store is None or self.heatmap is None:
            return
        threshold = None if self.region_calls.isChecked() else self.region_threshold.value()
        regions = regions_from_heatmap(self.heatmap, threshold,
                                       self.region_min_area.value() * 1e6, self.mpp)
        if regions:
            self.store.add(*regions)
