"""Training patches from annotated regions of slides, at the model's working resolution."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import shapely

from inference.annotations import Annotation
from inference.model import ModelMeta
from inference.patches import PatchGrid
from inference.predict import read_patches
from inference.slide import Slide
from training.data import PatchSet, empty_set

#: Annotation class -> training label.
DEFAULT_LABELS: Mapping[str, int] = {"IDC": 1, "Non-IDC": 0}


def class_labels(meta: ModelMeta | None) -> dict[str, int]:
    """The annotation classes that teach a model: its positive class 1, its negative class 0
    (IDC / Non-IDC, Metastasis / Normal)."""
    return dict(DEFAULT_LABELS) if meta is None else {meta.classes[1]: 1, meta.classes[0]: 0}


def region_cells(grid: PatchGrid, annotations: Sequence[Annotation], labels: Mapping[str, int] = DEFAULT_LABELS,
                 min_cover: float = 0.5) -> list[tuple[int, int, int, str]]:
    """(row, col, label, annotation id) of grid patches at least ``min_cover`` inside a region.

    A patch inside regions of both classes is dropped (conflicting labels).
    """
    found: dict[tuple[int, int], tuple[int, str]] = {}
    conflicts: set[tuple[int, int]] = set()
    for a in annotations:
        if a.cls not in labels or a.geometry.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        rr, cc = grid.patches_touching(a.geometry.bounds)
        if not len(rr):
            continue
        boxes = grid.patch_boxes(rr, cc)
        cover = shapely.area(shapely.intersection(boxes, a.geometry)) / (grid.patch_l0**2)
        for r, c in zip(rr[cover >= min_cover].tolist(), cc[cover >= min_cover].tolist(), strict=True):
            label = labels[a.cls]
            if (r, c) in found and found[(r, c)][0] != label:
                conflicts.add((r, c))
            found[(r, c)] = (label, a.id)
    return [(r, c, lab, aid) for (r, c), (lab, aid) in sorted(found.items()) if (r, c) not in conflicts]


def patches_from_annotations(slide: Slide, annotations: Sequence[Annotation], meta: ModelMeta,
                             labels: Mapping[str, int] = DEFAULT_LABELS, group_by: str = "slide",
                             min_cover: float = 0.5) -> PatchSet:
    """Patches of a slide's IDC / Non-IDC regions; group = slide name, or slide:region id."""
    grid = PatchGrid.build(slide.dimensions, slide.mpp, meta.mpp, meta.patch_size)
    cells = region_cells(grid, annotations, labels, min_cover)
    if not cells:
        return empty_set(meta.margin)
    rows = np.array([c[0] for c in cells])
    cols = np.array([c[1] for c in cells])
    images = read_patches(slide, grid, rows, cols, meta.margin)
    name = slide.path.name
    groups = np.array([name if group_by == "slide" else f"{name}:{c[3][:8]}" for c in cells], dtype=object)
    return PatchSet(images, np.array([c[2] for c in cells], np.int64), groups,
                    np.full(len(cells), f"regions of {name}", dtype=object), meta.margin)
