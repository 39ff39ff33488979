"""The worklist tab: a folder's slides ranked by the model's slide call and score (slides outside
the model's domain apart); open one with its heatmap at once."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSize, Qt, Signal, Slot
from PySide6.QtGui import QColor, QIcon, QPixmap
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from inference.worklist import (
    THUMB_PX,
    WorklistRow,
    compute_missing,
    list_folder,
    needs_heatmap,
    priority,
    scan,
)
from viewer.layers import array_to_qimage
from viewer.model_picker import ModelLibrary, ModelPicker
from viewer.session import SlideSession
from viewer.workers import JobRunner

COLUMNS = ("", "Slide", "Size (px)", "\u00b5m/px", "Heatmap", "Slide call", "Slide score", "IDC fraction",
           "IDC mm\u00b2", "Largest mm\u00b2", "Max P(IDC)")
#: Sorting this column ascending gives the default order (inference.worklist.priority).
CALL_COLUMN = 5


class _Item(QTableWidgetItem):
    """A cell that sorts by a number (missing values last in descending order)."""

    def __init__(self, text: str, key: float | str | tuple[float, ...] | None = None) -> None:
        super().__init__(text)
        self.key = key

    def __lt__(self, other: QTableWidgetItem) -> bool:
        a, b = self.key, getattr(other, "key", None)
        if isinstance(a, tuple) and isinstance(b, tuple):
            return a < b
        if isinstance(a, str) or isinstance(b, str):
            return str(a or "") < str(b or "")
        return (-1.0 if a is None else a) < (-1.0 if b is None else b)


def _num(v: float | None, fmt: str, scale: float = 1.0) -> _Item:
    return _Item("\u2014" if v is None else format(v * scale, fmt), v)


class WorklistTab(QWidget):
    """Rows of slides; double-click (or Enter) opens one; next / previous walk the list."""

    open_requested = Signal(object)  # Path of the slide to open with its heatmap

    def __init__(self, session: SlideSession, library: ModelLibrary | None = None) -> None:
        super().__init__()
        self.session = session
        self.picker = ModelPicker(library or ModelLibrary(session))
        session.model_changed.connect(self._on_session_model_changed)
        self.folder: Path | None = None
        self.rows: list[WorklistRow] = []
        self.scanner = JobRunner(self)
        self.scanner.report.connect(self._on_scanner_report)
        self.computer = JobRunner(self)
        self.computer.report.connect(self._on_computer_report)
        self.computer.finished.connect(self._on_computer_finished)
        self.computer.failed.connect(self._on_computer_failed)
        layout = QVBoxLayout(self)
        top = QHBoxLayout()
        self.folder_label = QLabel("File > Open folder shows a folder's slides here, the slides the model "
                                   "calls positive first.")
        top.addWidget(self.folder_label, 1)
        top.addWidget(QLabel("Model"))
        top.addWidget(self.picker)
        self.compute_button = QPushButton("Compute missing heatmaps")
        self.compute_button.clicked.connect(self.compute_missing)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        top.addWidget(self.compute_button)
        top.addWidget(self.cancel_button)
        layout.addLayout(top)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m slides")
        layout.addWidget(self.progress)
        self.table = QTableWidget(0, len(COLUMNS))
        self._name_columns()
        self.table.setIconSize(QSize(THUMB_PX, THUMB_PX))
        self.table.verticalHeader().setDefaultSectionSize(THUMB_PX + 6)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)  # names stay readable
        header.setStretchLastSection(True)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSortingEnabled(True)
        self.table.cellDoubleClicked.connect(self._on_table_cell_double_clicked)
        layout.addWidget(self.table, 1)
        self._update_controls()

    def _name_columns(self) -> None:
        model = self.session.model
        positive = model.meta.positive_class if model is not None else "IDC"
        self.table.setHorizontalHeaderLabels([c.replace("IDC", positive) for c in COLUMNS])

    # -- folder -----------------------------------------------------------------------------
    def _on_session_model_changed(self, _model: object) -> None:
        """Another model: the folder's figures are that model's (its cached heatmaps, if any),
        under its class name."""
        self._name_columns()
        if self.folder is not None:
            self.open_folder(self.folder)

    def open_folder(self, folder: str | Path) -> int:
        """List the folder's slides now; facts, thumbnails and figures fill in in the background."""
        self.scanner.stop()
        self.computer.stop()
        self.folder = Path(folder)
        self.rows = list_folder(self.folder)
        self.folder_label.setText(f"{self.folder}: {len(self.rows)} slide{'' if len(self.rows) == 1 else 's'}")
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(self.rows))
        for i in range(len(self.rows)):
            self._fill(i)
        self.table.setSortingEnabled(True)
        rows, model, folder_ = list(self.rows), self.session.model, self.folder
        self.scanner.start(lambda: scan(folder_, rows, model))
        self._update_controls()
        return len(self.rows)

    def _fill(self, i: int) -> None:
        """Write row ``i`` of self.rows into the table (wherever sorting has put it)."""
        r = self.rows[i]
        at = self._table_row(i)
        if at is None:
            return
        sorting = self.table.isSortingEnabled()
        self.table.setSortingEnabled(False)
        name = _Item(r.path.name, r.path.name)
        name.setData(Qt.ItemDataRole.UserRole, i)
        name.setToolTip(str(r.path) + (f"\n{r.reason}" if r.reason else ""))
        thumb = _Item("", r.idc_fraction)
        if r.thumbnail is not None:
            thumb.setIcon(QIcon(QPixmap.fromImage(array_to_qimage(r.thumbnail))))
        size = _Item(f"{r.dimensions[0]:,} x {r.dimensions[1]:,}" if r.dimensions else "\u2014",
                     float(r.dimensions[0] * r.dimensions[1]) if r.dimensions else None)
        call = _Item(_call_words(r), priority(r))
        if r.out_of_domain:
            call.setForeground(QColor(160, 0, 0))
            call.setToolTip("The slide lies outside what the model was trained on (colour score "
                            f"{r.domain_score:.1f}): its burden is not ranked." if r.domain_score is not None
                            else "The slide lies outside what the model was trained on: its burden is not ranked.")
        cells = [thumb, name, size, _num(r.mpp, ".3f"), _Item(r.status, r.status), call,
                 _num(r.slide_score, ".2f"), _num(r.idc_fraction, ".1%"), _num(r.idc_area_um2, ",.2f", 1e-6),
                 _num(r.largest_idc_region_um2, ",.2f", 1e-6), _num(r.max_probability, ".2f")]
        for c, item in enumerate(cells):
            self.table.setItem(at, c, item)
        self.table.setSortingEnabled(sorting)

    def _table_row(self, i: int) -> int | None:
        for at in range(self.table.rowCount()):
            item = self.table.item(at, 1)
            if item is None or item.data(Qt.ItemDataRole.UserRole) == i:
                return at
        return None

    @Slot(object)
    def _on_scanner_report(self, report: tuple[int, WorklistRow]) -> None:
        i, row = report
        self.rows[i] = row
        self._fill(i)
        if i == len(self.rows) - 1:
            self.sort_by_priority()
        self._update_controls()

    def sort_by_priority(self) -> None:
        """The default order: positive calls first, by slide score; out-of-domain slides apart."""
        self.table.sortItems(CALL_COLUMN, Qt.SortOrder.AscendingOrder)

    # -- opening ----------------------------------------------------------------------------
    def path_at(self, table_row: int) -> Path | None:
        item = self.table.item(table_row, 1)
        return None if item is None else self.rows[int(item.data(Qt.ItemDataRole.UserRole))].path

    @Slot(int, int)
    def _on_table_cell_double_clicked(self, table_row: int, _col: int) -> None:
        self.open_row(table_row)

    def open_row(self, table_row: int) -> None:
        path = self.path_at(table_row)
        if path is not None:
            self.table.selectRow(table_row)
            self.open_requested.emit(path)

    def step(self, delta: int) -> None:
        """Open the next (+1) or previous (-1) slide in the worklist's current order."""
        if not self.table.rowCount():
            return
        current = self.table.currentRow()
        target = 0 if current < 0 else min(max(current + delta, 0), self.table.rowCount() - 1)
        self.open_row(target)

    # -- computing --------------------------------------------------------------------------
    @Slot()
    def compute_missing(self) -> None:
        model = self.session.model
        if model is None or self.computer.running() or not self.rows:
            return
        missing = [r for r in self.rows if needs_heatmap(r)]
        if not missing:
            self.folder_label.setText("Every slide with a resolution has its heatmap.")
            return
        self.scanner.stop()
        self.progress.setRange(0, len(missing))
        self.progress.setValue(0)
        rows, device = list(self.rows), self.session.device
        self.computer.start(lambda: compute_missing(rows, model, device))
        self._update_controls()

    @Slot()
    def cancel(self) -> None:
        if self.computer.running():
            self.computer.stop()
            self.folder_label.setText("Cancelled; the heatmaps already computed are kept.")
            self._update_controls()

    @Slot(object)
    def _on_computer_report(self, report: tuple[int, WorklistRow]) -> None:
        i, row = report
        self.rows[i] = row
        self._fill(i)
        self.progress.setValue(self.progress.value() + 1)

    @Slot(bool)
    def _on_computer_finished(self, completed: bool) -> None:
        if completed:
            self.sort_by_priority()
            self.folder_label.setText(f"{self.folder}: every heatmap computed.")
        self._update_controls()

    @Slot(str)
    def _on_computer_failed(self, message: str) -> None:
        self.folder_label.setText(f"Computing stopped: {message}")
        self._update_controls()

    def _update_controls(self) -> None:
        running = self.computer.running()
        self.compute_button.setEnabled(bool(self.rows) and not running and self.session.model is not None)
        self.cancel_button.setEnabled(running)
        self.progress.setVisible(running or self.progress.value() > 0)

    def shutdown(self) -> None:
        self.scanner.shutdown()
        self.computer.shutdown()


def _call_words(row: WorklistRow) -> str:
    """The slide call as the worklist shows it; out-of-domain slides say so first."""
    if row.out_of_domain:
        return "\u26a0 out of domain (" + (row.slide_call or "uncertain") + ")"
    return row.slide_call or "\u2014"
