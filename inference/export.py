"""Exports of annotated regions: image crops with masks, and a per-slide report (CSV + JSON)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import tifffile
from PIL import Image, ImageDraw

from inference.annotations import Annotation, AnnotationStore
from inference.atomic import write_bytes
from inference.geometry import Rect
from inference.heatmap import DEFAULT_COLORMAP, Heatmap, colormap_lut
from inference.slide import Slide, SlideError

#: Crops with more pixels than this are written as tiled TIFF instead of PNG.
PNG_MAX_PIXELS = 50_000_000
#: Refuse crops above this many pixels (choose a coarser resolution).
MAX_CROP_PIXELS = 1_000_000_000


@dataclass(frozen=True)
class RegionRow:
    id: str
    name: str
    cls: str
    source: str
    geometry: str
    area_um2: float | None
    mean_prob_idc: float | None
    idc_fraction: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def region_rows(annotations: Sequence[Annotation], mpp: float | None, heatmap: Heatmap | None) -> list[RegionRow]:
    rows = []
    for a in annotations:
        mean, frac = a.heatmap_stats(heatmap)
        rows.append(RegionRow(a.id, a.name, a.cls, a.source, a.geometry.geom_type, a.area_um2(mpp), mean, frac))
    return rows


def union_area_um2(annotations: Sequence[Annotation], mpp: float | None) -> dict[str, float] | None:
    """Area of the union of each class's regions in um2 (overlaps counted once)."""
    if mpp is None:
        return None
    by_class: dict[str, list[Any]] = {}
    for a in annotations:
        if a.geometry.area > 0:
            by_class.setdefault(a.cls, []).append(a.geometry)
    return {cls: float(shapely.union_all(geoms).area) * mpp * mpp for cls, geoms in sorted(by_class.items())}


def report(annotations: Sequence[Annotation], slide: Slide, heatmap: Heatmap | None) -> dict[str, Any]:
    """Per-region figures and totals (areas in um2; None where the MPP is unknown).

    Per-region rows keep each region's own area; the totals are areas of the union per class,
    so overlapping regions are not counted twice.
    """
    rows = region_rows(annotations, slide.mpp, heatmap)
    by_class = union_area_um2(annotations, slide.mpp)
    idc = by_class.get("IDC", 0.0) if by_class is not None else None
    return {
        "slide": slide.path.name,
        "mpp": slide.mpp,
        "model": heatmap.info.model_id if heatmap is not None else None,
        "regions": [r.as_dict() for r in rows],
        "totals": {
            "regions": len(rows),
            "idc_regions": sum(1 for r in rows if r.cls == "IDC"),
            "idc_area_um2": idc,
            "idc_area_mm2": idc / 1e6 if idc is not None else None,
            "area_um2_by_class": by_class,
            "note": "areas of the union of each class's regions (overlaps counted once)",
        },
    }


def _plain(value: Any) -> str:
    """A CSV cell: plain decimals (never 4.8e+06), empty for missing values."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if math.isfinite(value) else ""
    return str(value)


def write_report(rep: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """<stem>.report.json (regions and totals) and <stem>.report.csv (one header, one row per region)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.report.json"
    write_bytes(json_path, json.dumps(rep, indent=1).encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["id", "name", "cls", "source", "geometry", "area_um2", "mean_prob_idc", "idc_fraction"]
    w.writerow(["id", "name", "class", "source", "geometry", "area_um2", "mean_prob_idc", "idc_fraction"])
    for r in rep["regions"]:
        w.writerow([_plain(r[c]) for c in cols])
    csv_path = out_dir / f"{stem}.report.csv"
    write_bytes(csv_path, buf.getvalue().encode())
    return [json_path, csv_path]


def crop_scale(slide: Slide, mpp_out: float | None) -> float:
    """Output pixels per level-0 pixel for a requested output resolution (None = level 0).

    Never finer than the slide itself: a request finer than level 0 gives level 0 (upsampling
    a 4 um/px slide to 2 um/px only made the files four times larger).
    """
    if mpp_out is None:
        return 1.0
    if slide.mpp is None:
        raise SlideError("The slide's resolution (MPP) is unknown; enter it or export at level 0.")
    return min(1.0, slide.mpp / mpp_out)


def _to_px(coords: np.ndarray, bbox: Rect, scale: float) -> list[tuple[float, float]]:
    return [((x - bbox.x) * scale, (y - bbox.y) * scale) for x, y in coords]


def _rings(geom) -> list[tuple[list, bool]]:  # noqa: ANN001
    """(coordinates, is_hole) of every polygon ring of a geometry."""
    out = []
    for part in getattr(geom, "geoms", [geom]):
        if part.geom_type == "Polygon":
            out.append((list(part.exterior.coords), False))
            out.extend((list(r.coords), True) for r in part.interiors)
    return out


def mask_image(a: Annotation, bbox: Rect, size: tuple[int, int], scale: float) -> np.ndarray:
    """Binary mask (h, w) uint8 0/255 of an annotation over its crop."""
    img = Image.new("L", size, 0)
    d = ImageDraw.Draw(img)
    if a.geometry.geom_type in ("Point", "MultiPoint", "LineString"):
        r = max(2, round(3 * max(1, scale)))
        for part in getattr(a.geometry, "geoms", [a.geometry]):
            pts = _to_px(np.asarray(part.coords), bbox, scale)
            if len(pts) == 1:
                (x, y), = pts
                d.ellipse((x - r, y - r, x + r, y + r), fill=255)
            else:
                d.line(pts, fill=255, width=r)
        return np.asarray(img)
    for coords, hole in sorted(_rings(a.geometry), key=lambda t: t[1]):  # outers first, then holes
        d.polygon(_to_px(np.asarray(coords), bbox, scale), fill=0 if hole else 255)
    return np.asarray(img)


def crop(slide: Slide, a: Annotation, scale: float, margin_l0: int = 0, outline: bool = False,
         color: tuple[int, int, int] = (255, 0, 0), heatmap: Heatmap | None = None,
         heatmap_alpha: float = 0.45, colormap: str = DEFAULT_COLORMAP) -> tuple[np.ndarray, np.ndarray, Rect]:
    """(RGB crop, mask, level-0 bbox) of an annotation at ``scale`` output px per level-0 px."""
    minx, miny, maxx, maxy = a.geometry.bounds
    bbox = Rect.from_corners(math.floor(minx) - margin_l0, math.floor(miny) - margin_l0,
                             math.ceil(maxx) + margin_l0, math.ceil(maxy) + margin_l0)
    if bbox.w == 0 or bbox.h == 0:  # a point: a small square around it
        pad = max(32, round(64 / max(scale, 1e-6)))
        bbox = Rect(bbox.x - pad, bbox.y - pad, bbox.w + 2 * pad, bbox.h + 2 * pad)
    size = (max(1, round(bbox.w * scale)), max(1, round(bbox.h * scale)))
    if size[0] * size[1] > MAX_CROP_PIXELS:
        raise SlideError(f"The crop of {a.name or a.id} would be {size[0]} x {size[1]} pixels; "
                         "choose a coarser output resolution.")
    rgb = slide.read(bbox, size)
    mask = mask_image(a, bbox, size, scale)
    if heatmap is not None:
        rgb = _blend_heatmap(rgb, heatmap, bbox, size, heatmap_alpha, colormap)
    if outline:
        img = Image.fromarray(rgb)
        d = ImageDraw.Draw(img)
        width = max(2, round(size[0] / 400))
        for coords, _hole in _rings(a.geometry):
            d.line(_to_px(np.asarray(coords), bbox, scale), fill=color, width=width, joint="curve")
        rgb = np.asarray(img)
    return rgb, mask, bbox


def _blend_heatmap(rgb: np.ndarray, heatmap: Heatmap, bbox: Rect, size: tuple[int, int], alpha: float,
                   colormap: str) -> np.ndarray:
    """Alpha-blend the heatmap cells over a crop (nearest cell for each output pixel)."""
    w, h = size
    xs = heatmap.grid.cell_index(bbox.x + (np.arange(w) + 0.5) * bbox.w / w)
    ys = heatmap.grid.cell_index(bbox.y + (np.arange(h) + 0.5) * bbox.h / h)
    prob = heatmap.prob
    valid_x = (xs >= 0) & (xs < prob.shape[1])
    valid_y = (ys >= 0) & (ys < prob.shape[0])
    p = np.full((h, w), np.nan, np.float32)
    p[np.ix_(valid_y, valid_x)] = prob[np.ix_(ys[valid_y], xs[valid_x])]
    lut = colormap_lut(colormap)
    shown = np.isfinite(p) & (np.nan_to_num(p, nan=-1.0) >= heatmap.call_threshold)  # the model's calls
    col = lut[np.clip(np.nan_to_num(p) * 255, 0, 255).astype(np.uint8)].astype(np.float32)
    out = rgb.astype(np.float32)
    out[shown] = out[shown] * (1 - alpha) + col[shown] * alpha
    return out.round().astype(np.uint8)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "region"


def save_image(path: Path, arr: np.ndarray) -> Path:
    """PNG, or a tiled TIFF for very large images; written atomically."""
    if arr.shape[0] * arr.shape[1] > PNG_MAX_PIXELS:
        path = path.with_suffix(".tif")
        buf = io.BytesIO()
        tifffile.imwrite(buf, arr, tile=(256, 256), compression="zlib")
        write_bytes(path, buf.getvalue())
        return path
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    write_bytes(path, buf.getvalue())
    return path


@dataclass(frozen=True)
class ExportProgress:
    """One region's crop and mask written (``done`` of ``total``); the last report has the report files."""

    done: int
    total: int
    paths: tuple[Path, ...]


def iter_export_regions(slide: Slide, annotations: Sequence[Annotation], out_dir: Path,
                        mpp_out: float | None = None, overlay: bool = False, heatmap: Heatmap | None = None,
                        store: AnnotationStore | None = None, margin_l0: int = 0) -> Iterator[ExportProgress]:
    """Write a crop and a mask per annotation, then the report, yielding after each region.

    Stopping is closing the generator: the files already written stay complete (atomic writes).
    """
    scale = crop_scale(slide, mpp_out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = slide.path.stem
    total = len(annotations)
    for i, a in enumerate(annotations, 1):
        color = store.color(a.cls) if store is not None else (255, 0, 0)
        rgb, mask, _bbox = crop(slide, a, scale, margin_l0, outline=overlay, color=color,
                                heatmap=heatmap if overlay else None)
        base = f"{stem}_{i:03d}_{safe_name(a.cls)}_{safe_name(a.name or a.id[:8])}"
        yield ExportProgress(i, total, (save_image(out_dir / f"{base}.png", rgb),
                                        save_image(out_dir / f"{base}.mask.png", mask)))
    yield ExportProgress(total, total, tuple(write_report(report(annotations, slide, heatmap), out_dir, stem)))


def export_regions(slide: Slide, annotations: Sequence[Annotation], out_dir: Path, mpp_out: float | None = None,
                   overlay: bool = False, heatmap: Heatmap | None = None, store: AnnotationStore | None = None,
                   margin_l0: int = 0) -> list[Path]:
    """:func:`iter_export_regions` run to the end; returns the written paths."""
    return [p for step in iter_export_regions(slide, annotations, out_dir, mpp_out, overlay, heatmap, store,
                                              margin_l0) for p in step.paths]
