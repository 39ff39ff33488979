"""Patch-level ground truth beside a slide (``<stem>.labels.csv``) and agreement with a heatmap."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference import metrics as M
from inference.geometry import Rect
from inference.heatmap import Heatmap


@dataclass(frozen=True)
class PatchLabel:
    """A labelled level-0 rectangle: 1 = IDC, 0 = non-IDC."""

    rect: Rect
    label: int


def labels_path(slide_path: Path) -> Path:
    return slide_path.with_name(slide_path.stem + ".labels.csv")


def load_labels(path: Path) -> list[PatchLabel]:
    """Read x_l0,y_l0,w_l0,h_l0,label rows."""
    with open(path, newline="") as fh:
        return [PatchLabel(Rect(int(r["x_l0"]), int(r["y_l0"]), int(r["w_l0"]), int(r["h_l0"])), int(r["label"]))
                for r in csv.DictReader(fh)]


def agreement(heatmap: Heatmap, labels: list[PatchLabel]) -> M.Metrics | None:
    """Metrics of the heatmap against labels: each label's centre cell, where computed."""
    prob = heatmap.prob
    y, p = [], []
    for lab in labels:
        cell = heatmap.grid.cell_at(lab.rect.x + lab.rect.w / 2, lab.rect.y + lab.rect.h / 2)
        if cell is not None and np.isfinite(prob[cell]):
            y.append(lab.label)
            p.append(float(prob[cell]))
    if len(set(y)) < 2:
        return None
    return M.compute(np.array(y), np.array(p), threshold=heatmap.info.threshold)
