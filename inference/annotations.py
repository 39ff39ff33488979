"""Annotations: immutable values with shapely geometry in level-0 pixels, and a store with undo.

The store is a plain Python model: views subscribe with ``store.subscribe(callback)``.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from inference.errors import UserError
from inference.heatmap import Heatmap
from inference.patches import PatchGrid


class AnnotationError(UserError):
    """Annotations could not be read or written; one sentence for the user."""


@dataclass(frozen=True)
class AnnotationClass:
    name: str
    color: tuple[int, int, int]


DEFAULT_CLASSES: tuple[AnnotationClass, ...] = (
    AnnotationClass("IDC", (220, 30, 30)),
    AnnotationClass("Non-IDC", (30, 160, 60)),
    AnnotationClass("Metastasis", (200, 40, 160)),
    AnnotationClass("Normal", (60, 170, 170)),
    AnnotationClass("Tissue", (40, 90, 220)),
    AnnotationClass("Other", (150, 150, 150)),
)

SOURCES = ("manual", "model")


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Annotation:
    """One region or point; ``geometry`` is in level-0 pixels."""

    geometry: BaseGeometry = field(compare=False)
    cls: str = "IDC"
    name: str = ""
    note: str = ""
    source: str = "manual"
    id: str = field(default_factory=new_id)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}")

    def same_as(self, other: Annotation) -> bool:
        """Equal fields and equal geometry (exactly)."""
        return self == other and self.geometry.equals_exact(other.geometry, 0)

    def area_um2(self, mpp: float | None) -> float | None:
        """Area in square micrometres, or None when the slide's resolution is unknown."""
        if mpp is None:
            return None
        return float(self.geometry.area) * mpp * mpp

    def heatmap_stats(self, heatmap: Heatmap | None) -> tuple[float | None, float | None]:
        """(mean IDC probability, share of cells the model calls IDC) under the region."""
        if heatmap is None or self.geometry.area == 0:
            return None, None
        rr, cc = heatmap.grid.cells_with_centre_in(self.geometry)
        p = heatmap.prob[rr, cc]
        p = p[np.isfinite(p)]
        if not len(p):
            return None, None
        return float(p.mean()), float((p >= heatmap.call_threshold).mean())


Listener = Callable[[], None]


class AnnotationStore:
    """The annotations of one slide, with undo/redo of every edit."""

    def __init__(self, annotations: Iterable[Annotation] = (),
                 classes: Sequence[AnnotationClass] = DEFAULT_CLASSES) -> None:
        self._items: tuple[Annotation, ...] = tuple(annotations)
        self.classes: list[AnnotationClass] = list(classes)
        self._undo: list[tuple[Annotation, ...]] = []
        self._redo: list[tuple[Annotation, ...]] = []
        self._listeners: list[Listener] = []
        self.revision = 0

    # -- reading ----------------------------------------------------------------------------
    @property
    def items(self) -> tuple[Annotation, ...]:
        return self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, ann_id: str) -> Annotation | None:
        return next((a for a in self._items if a.id == ann_id), None)

    def color(self, cls: str) -> tuple[int, int, int]:
        return next((c.color for c in self.classes if c.name == cls), (255, 200, 0))

    def ensure_class(self, name: str, color: tuple[int, int, int] | None = None) -> None:
        if not any(c.name == name for c in self.classes):
            # Seeded by the name's CRC, not hash(): str hashes change from one process to the next.
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            self.classes.append(AnnotationClass(name, color or tuple(int(v) for v in rng.integers(40, 230, 3))))

    # -- editing (each call is one undo step) -----------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _commit(self, new: tuple[Annotation, ...]) -> None:
        self._undo.append(self._items)
        self._redo.clear()
        self._set(new)

    def _set(self, new: tuple[Annotation, ...]) -> None:
        self._items = new
        self.revision += 1
        for listener in list(self._listeners):
            listener()

    def add(self, *annotations: Annotation) -> None:
        for a in annotations:
            self.ensure_class(a.cls)
        self._commit(self._items + tuple(annotations))

    def remove(self, *ids: str) -> None:
        drop = set(ids)
        self._commit(tuple(a for a in self._items if a.id not in drop))

    def update(self, ann_id: str, **changes: Any) -> None:
        """Replace fields of one annotation (geometry, cls, name, note, source).

        A model region whose outline or class a person changes becomes the person's own
        (source "manual"): it is then ground truth for training and validation.
        """
        if "cls" in changes:
            self.ensure_class(changes["cls"])
        if "source" not in changes and ("geometry" in changes or "cls" in changes):
            changes["source"] = "manual"
        self._commit(tuple(replace(a, **changes) if a.id == ann_id else a for a in self._items))

    def confirm(self, *ids: str) -> int:
        """A person accepts model regions as they are (one undo step); returns how many changed."""
        chosen = set(ids)
        items = tuple(replace(a, source="manual") if a.id in chosen and a.source == "model" else a
                      for a in self._items)
        changed = sum(1 for a, b in zip(items, self._items, strict=True) if a.source != b.source)
        if changed:
            self._commit(items)
        return changed

    def truth(self, labels: Iterable[str]) -> tuple[Annotation, ...]:
        """Annotations of these classes that a person drew, edited or confirmed (never the model's own)."""
        wanted = set(labels)
        return tuple(a for a in self._items if a.cls in wanted and a.source == "manual")

    def replace_all(self, annotations: Iterable[Annotation]) -> None:
        annotations = tuple(annotations)
        for a in annotations:
            self.ensure_class(a.cls)
        self._commit(annotations)

    def clear_history(self) -> None:
        """Forget undo/redo (after loading a saved state, which is not an edit)."""
        self._undo.clear()
        self._redo.clear()

    def can_undo(self) -> bool:
        return bool(self._undo)

    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> None:
        if self._undo:
            self._redo.append(self._items)
            self._set(self._undo.pop())

    def redo(self) -> None:
        if self._redo:
            self._undo.append(self._items)
            self._set(self._redo.pop())


def regions_from_heatmap(heatmap: Heatmap, threshold: float | None = None, min_area_um2: float = 0.0,
                         mpp: float | None = None) -> list[Annotation]:
    """Editable polygons of the model's positive class ("IDC region N", "Metastasis region N"):
    the cells it calls (``threshold`` None: :attr:`Heatmap.called`, as the cohort figures count
    them), or the cells at or above ``threshold``, merged on the grid.

    Edges follow the cell grid with one vertex per corner (collinear points removed); holes are
    kept; regions smaller than ``min_area_um2`` are dropped (needs ``mpp``).
    """
    mask = heatmap.called if threshold is None else np.nan_to_num(heatmap.prob, nan=-1.0) >= threshold
    positive = heatmap.info.positive
    return regions_from_cells(heatmap.grid, mask, positive, f"{positive} region", min_area_um2, mpp)


def regions_from_cells(grid: PatchGrid, mask: np.ndarray, cls: str, name: str, min_area_um2: float = 0.0,
                       mpp: float | None = None) -> list[Annotation]:
    """The heatmap cells in ``mask`` as polygons of class ``cls``, merged on the cell grid and
    named "<name> 1", "<name> 2"... from the largest (see :func:`regions_from_heatmap`)."""
    if not mask.any():
        return []
    rows, cols = np.nonzero(mask)
    union = shapely.union_all(grid.cell_boxes(rows, cols)).simplify(0)
    polys = list(getattr(union, "geoms", [union]))
    polys.sort(key=lambda p: -p.area)
    out = []
    for poly in polys:
        if mpp is not None and poly.area * mpp * mpp < min_area_um2:
            continue
        out.append(Annotation(geometry=poly, cls=cls, name=f"{name} {len(out) + 1}", source="model"))
    return out
