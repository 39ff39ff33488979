"""Training patches from annotated regions of slides, at the model's working resolution."""

from __future__ import annotations

import math
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


def region_cells(grid: PatchGrid, annotations: Sequence[Annotation], labels: Mapping[str, int] = DEFAULT_LABELS,
                 min_cover: float = 0.5) -> list[tuple[int, int, int, str]]:
    """(row, col, label, annotation id) of grid patches at least ``min_cover`` inside a region.

    A patch inside regions of both classes is dropped (conflicting labels).
    """
    rows_max, cols_max = grid.patch_shape
    found: dict[tuple[int, int], tuple[int, str]] = {}
    conflicts: set[tuple[int, int]] = set()
    for a in annotations:
        if a.cls not in labels or a.geometry.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        minx, miny, maxx, maxy = a.geometry.bounds
        c0 = max(0, math.floor((minx - grid.patch_l0) / grid.stride_l0))
        r0 = max(0, math.floor((miny - grid.patch_l0) / grid.stride_l0))
        c1 = min(cols_max - 1, math.ceil(maxx / grid.stride_l0))
        r1 = min(rows_max - 1, math.ceil(maxy / grid.stride_l0))
        if c1 < c0 or r1 < r0:
            continue
        rr, cc = np.mgrid[r0 : r1 + 1, c0 : c1 + 1]
        boxes = shapely.box(cc * grid.stride_l0, rr * grid.stride_l0,
                            cc * grid.stride_l0 + grid.patch_l0, rr * grid.stride_l0 + grid.patch_l0)
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
        return empty_set()
    rows = np.array([c[0] for c in cells])
    cols = np.array([c[1] for c in cells])
    images = read_patches(slide, grid, rows, cols)
    name = slide.path.name
    groups = np.array([name if group_by == "slide" else f"{name}:{c[3][:8]}" for c in cells], dtype=object)
    return PatchSet(images, np.array([c[2] for c in cells], np.int64), groups,
                    np.full(len(cells), f"regions of {name}", dtype=object))
