"""Live training curves: loss per batch and epoch, validation metrics, and the epoch table."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtWidgets import QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from training.loop import EpochReport, StepReport


class TrainingCurves(QWidget):
    """Plots and table that a training run's Step and Epoch reports fill in."""

    def __init__(self) -> None:
        super().__init__()
        rv = QVBoxLayout(self)
        rv.setContentsMargins(0, 0, 0, 0)
        pg.setConfigOptions(antialias=True, background="w", foreground="k")
        self.loss_plot = pg.PlotWidget(title="Loss")
        self.loss_plot.addLegend()
        self.loss_plot.setLabel("bottom", "epoch")
        self.loss_plot.getAxis("bottom").enableAutoSIPrefix(False)  # never "epoch (x0.001)"
        self.step_curve = self.loss_plot.plot(pen=pg.mkPen((150, 150, 220), width=1), name="train (batches)")
        self.train_curve = self.loss_plot.plot(pen=pg.mkPen((30, 60, 200), width=2), symbol="o", symbolSize=6,
                                               name="train")
        self.val_curve = self.loss_plot.plot(pen=pg.mkPen((220, 60, 30), width=2), symbol="s", symbolSize=6,
                                             name="validation")
        rv.addWidget(self.loss_plot)
        self.metric_plot = pg.PlotWidget(title="Validation")
        self.metric_plot.addLegend()
        self.metric_plot.setLabel("bottom", "epoch")
        self.metric_plot.getAxis("bottom").enableAutoSIPrefix(False)
        self.metric_plot.setYRange(0.4, 1.0)
        self.bacc_curve = self.metric_plot.plot(pen=pg.mkPen((20, 140, 60), width=2), symbol="o", symbolSize=6,
                                                name="balanced accuracy")
        self.auc_curve = self.metric_plot.plot(pen=pg.mkPen((140, 40, 160), width=2), symbol="t", symbolSize=6,
                                               name="AUC")
        rv.addWidget(self.metric_plot)
        self.epoch_table = QTableWidget(0, 6)
        self.epoch_table.setHorizontalHeaderLabels(["Epoch", "Train loss", "Val loss", "Bal. acc", "AUC", "F1"])
        self.epoch_table.verticalHeader().setVisible(False)
        self.epoch_table.setMinimumHeight(140)
        rv.addWidget(self.epoch_table)
        self.reset()

    def reset(self) -> None:
        self._step_x: list[float] = []
        self._step_loss: list[float] = []
        self._epochs: list[EpochReport] = []
        for curve in (self.step_curve, self.train_curve, self.val_curve, self.bacc_curve, self.auc_curve):
            curve.setData([], [])
        self.epoch_table.setRowCount(0)

    def add_step(self, report: StepReport) -> None:
        self._step_x.append(report.epoch + (report.step + 1) / report.steps)
        self._step_loss.append(report.loss)
        self.step_curve.setData(self._step_x, self._step_loss)

    def add_epoch(self, report: EpochReport) -> None:
        self._epochs.append(report)
        xs = [e.epoch for e in self._epochs]
        self.train_curve.setData(xs, [e.train_loss for e in self._epochs])
        self.val_curve.setData(xs, [e.val_loss for e in self._epochs])
        self.bacc_curve.setData(xs, [e.val["balanced_accuracy"] for e in self._epochs])
        self.auc_curve.setData(xs, [e.val["auc"] for e in self._epochs])
        r = self.epoch_table.rowCount()
        self.epoch_table.insertRow(r)
        values = [str(report.epoch), f"{report.train_loss:.4f}", f"{report.val_loss:.4f}",
                  f"{report.val['balanced_accuracy']:.3f}", f"{report.val['auc']:.3f}", f"{report.val['f1']:.3f}"]
        for c, text in enumerate(values):
            self.epoch_table.setItem(r, c, QTableWidgetItem(text + (" *" if c == 0 and report.best else "")))
