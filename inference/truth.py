"""Ground truth for a slide and the heatmap's agreement with it, cell by cell.

Truth is a set of level-0 regions labelled IDC (1) or non-IDC (0), read from the demo's
``<stem>.labels.csv`` (one labelled patch rectangle per row), a QuPath GeoJSON or an ASAP XML
file. A heatmap cell takes the label of the regions containing its centre; cells in no region,
or in regions of both labels, are not compared. A labelled cell outside the tissue mask is never
computed and is shown as no IDC, so it counts with probability 0.
"""

from __future__ import annotations

import csv
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from inference import metrics as M
from inference.annotation_io import read_file
from inference.annotations import Annotation, AnnotationClass, AnnotationError, regions_from_cells
from inference.atomic import atomic_path
from inference.errors import UserError
from inference.geometry import Rect
from inference.heatmap import Heatmap
from inference.patches import PatchGrid

IDC_NAMES = {"idc", "tumor", "tumour", "invasive ductal carcinoma", "positive"}
NON_IDC_NAMES = {"non-idc", "non idc", "nonidc", "non-tumor", "non-tumour", "normal", "benign", "negative"}
#: Classes of the regions where a heatmap disagrees with the truth (:func:`disagreements`).
FALSE_IDC = "False IDC"
MISSED_IDC = "Missed IDC"
DISAGREEMENT_CLASSES = (AnnotationClass(FALSE_IDC, (255, 150, 0)), AnnotationClass(MISSED_IDC, (170, 40, 230)))


class TruthError(UserError, ValueError):
    """A ground-truth file cannot be used; one sentence for the user."""


@dataclass(frozen=True)
class PatchLabel:
    """A labelled level-0 rectangle: 1 = IDC, 0 = non-IDC."""

    rect: Rect
    label: int


@dataclass(frozen=True)
class Truth:
    """Labelled level-0 regions of one slide."""

    regions: tuple[tuple[BaseGeometry, int], ...]
    source: str

    @property
    def idc_outlines(self) -> list[BaseGeometry]:
        return [g for g, lab in self.regions if lab == 1]


@dataclass(frozen=True)
class Agreement:
    """Cell-level metrics of a heatmap against truth."""

    metrics: M.Metrics
    cells: int  # labelled cells compared
    idc_cells: int
    outside_tissue: int  # labelled cells outside the tissue mask, counted as P = 0
    ambiguous: int  # cells inside both IDC and non-IDC regions, not compared


def labels_path(slide_path: Path) -> Path:
    return slide_path.with_name(slide_path.stem + ".labels.csv")


def load_labels(path: Path) -> list[PatchLabel]:
    """Read x_l0,y_l0,w_l0,h_l0,label rows."""
    try:
        with open(path, newline="") as fh:
            return [PatchLabel(Rect(int(r["x_l0"]), int(r["y_l0"]), int(r["w_l0"]), int(r["h_l0"])), int(r["label"]))
                    for r in csv.DictReader(fh)]
    except OSError as exc:
        raise TruthError(f"{path.name} cannot be read.") from exc
    except (KeyError, ValueError, TypeError, csv.Error) as exc:
        raise TruthError(f"{path.name} is not a labels file (columns x_l0, y_l0, w_l0, h_l0, label).") from exc


def write_labels(path: Path, labels: Iterable[PatchLabel]) -> Path:
    """Write x_l0,y_l0,w_l0,h_l0,label rows (top to bottom, left to right), atomically."""
    rows = sorted(((lab.rect.x, lab.rect.y, lab.rect.w, lab.rect.h, lab.label) for lab in labels),
                  key=lambda r: (r[1], r[0]))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x_l0", "y_l0", "w_l0", "h_l0", "label"])
        w.writerows(rows)
    return Path(path)


def truth_from_labels(labels: list[PatchLabel], source: str = "labels") -> Truth:
    regions = tuple((shapely.box(lab.rect.x, lab.rect.y, lab.rect.right, lab.rect.bottom), int(lab.label == 1))
                    for lab in labels if not lab.rect.is_empty)
    return Truth(regions, source)


def class_label(name: str) -> int | None:
    """1 for an IDC class name, 0 for a non-IDC one, None for any other class."""
    key = name.strip().lower()
    return 1 if key in IDC_NAMES else 0 if key in NON_IDC_NAMES else None


def load_truth(path: str | Path) -> Truth:
    """Truth from a labels CSV, a QuPath GeoJSON or an ASAP XML file (one-sentence errors)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        truth = truth_from_labels(load_labels(path), path.name)
    else:
        try:
            imported = read_file(path)
        except AnnotationError as exc:
            raise TruthError(str(exc)) from exc
        regions = []
        for a in imported.annotations:
            lab = class_label(a.cls)
            if lab is not None and a.geometry.area > 0:
                regions.append((a.geometry, lab))
        truth = Truth(tuple(regions), path.name)
    if not truth.regions:
        raise TruthError(f"{path.name} holds no IDC or Non-IDC regions to compare with.")
    return truth


def cell_truth(grid: PatchGrid, truth: Truth) -> tuple[np.ndarray, int]:
    """(rows, cols) int8 labels of heatmap cells (-1: not labelled) and the number of ambiguous cells."""
    shape = grid.cell_shape
    seen = np.zeros((2, *shape), bool)
    region, rr, cc = grid.cells_with_centre_in_each([geom for geom, _ in truth.regions])
    seen[np.array([lab for _, lab in truth.regions], np.int64)[region], rr, cc] = True
    both = seen[0] & seen[1]
    out = np.full(shape, -1, np.int8)
    out[seen[0]] = 0
    out[seen[1]] = 1
    out[both] = -1
    return out, int(both.sum())


def away_from_borders(labels: np.ndarray) -> np.ndarray:
    """Cell labels with every cell that touches a cell of the other class (8-neighbourhood) unlabelled.

    Hand-drawn regions and per-patch labels are least certain where IDC meets non-IDC, and a
    cell there shows some of both. Agreement on the cells that remain says how much of a
    model's disagreement with the truth lies on those borders. Unlabelled cells make no border.
    """
    rows, cols = labels.shape
    padded = np.pad(labels, 1, constant_values=-1)
    border = np.zeros(labels.shape, bool)
    for dy in range(3):
        for dx in range(3):
            near = padded[dy : dy + rows, dx : dx + cols]
            border |= (near >= 0) & (near != labels)
    return np.where(border & (labels >= 0), -1, labels).astype(labels.dtype)


def _compared(heatmap: Heatmap, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cells compared, the probability shown on every cell, cells outside the tissue): labelled
    cells that are computed, or outside the tissue mask and so shown as no IDC (probability 0)."""
    prob = heatmap.prob
    computed = np.isfinite(prob)
    outside = ~heatmap.tissue_cells
    return (labels >= 0) & (computed | outside), np.where(computed, prob, 0.0), outside & ~computed


def agreement(heatmap: Heatmap, labels: np.ndarray, ambiguous: int = 0) -> Agreement | None:
    """Metrics of the map shown against cell labels, at the model's threshold for that map.

    Cells still to be computed are left out, so the figure can be shown while the heatmap fills.
    """
    use, prob, outside = _compared(heatmap, labels)
    if not use.any():
        return None
    y = labels[use].astype(np.int64)
    m = M.compute(y, prob[use], threshold=heatmap.call_threshold)
    return Agreement(m, int(use.sum()), int(y.sum()), int((use & outside).sum()), ambiguous)


def disagreements(heatmap: Heatmap, labels: np.ndarray) -> list[Annotation]:
    """Where the map shown disagrees with the truth at the model's threshold, as regions to review.

    :data:`FALSE_IDC`: cells called IDC that the truth labels non-IDC; :data:`MISSED_IDC`: cells
    the truth labels IDC that are not called (outside the tissue mask included). The cells are
    exactly those :func:`agreement` counts as false positives and false negatives, merged on the
    cell grid, largest region first. Ids follow from the heatmap, the map shown and each region's
    name, so the same heatmap and truth always give the same regions.
    """
    use, prob, _ = _compared(heatmap, labels)
    called = prob >= heatmap.call_threshold
    regions = (regions_from_cells(heatmap.grid, use & called & (labels == 0), FALSE_IDC, FALSE_IDC)
               + regions_from_cells(heatmap.grid, use & ~called & (labels == 1), MISSED_IDC, MISSED_IDC))
    key = f"idc-disagreement:{heatmap.info.key()}:{'context' if heatmap.context else 'per-patch'}"
    return [replace(r, id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{key}:{r.name}"))) for r in regions]
