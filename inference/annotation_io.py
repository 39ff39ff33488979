"""Annotation files: QuPath GeoJSON and ASAP XML, read and written; atomic autosave."""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import mapping, shape

from inference.annotations import Annotation, AnnotationClass, AnnotationError, AnnotationStore
from inference.atomic import write_bytes
from inference.slide import MAX_SIDE_L0

log = logging.getLogger(__name__)

#: ASAP group holding the holes of a class's polygons (ASAP polygons cannot have holes).
HOLE_SUFFIX = " hole"
SUPPORTED_GEOMETRIES = {"Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString"}


@dataclass(frozen=True)
class ImportResult:
    annotations: list[Annotation]
    classes: list[AnnotationClass]
    skipped: list[str]  # one line per skipped feature, for the user


# -- GeoJSON (QuPath) ----------------------------------------------------------------------
def to_geojson(annotations: Sequence[Annotation], store: AnnotationStore | None = None,
               measurements: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """A FeatureCollection as QuPath writes it (coordinates in level-0 pixels)."""
    features = []
    for a in annotations:
        color = store.color(a.cls) if store is not None else (255, 0, 0)
        props: dict[str, Any] = {
            "objectType": "annotation",
            "classification": {"name": a.cls, "color": list(color)},
            "name": a.name,
            "isLocked": False,
            "source": a.source,
        }
        if a.note:
            props["note"] = a.note
        if measurements and a.id in measurements:
            props["measurements"] = measurements[a.id]
        features.append({"type": "Feature", "id": a.id, "geometry": mapping(a.geometry), "properties": props})
    return {"type": "FeatureCollection", "features": features}


def dumps_geojson(annotations: Sequence[Annotation], store: AnnotationStore | None = None,
                  measurements: dict[str, dict[str, float]] | None = None) -> bytes:
    return json.dumps(to_geojson(annotations, store, measurements), indent=1).encode()


def parse_geojson(data: bytes | str, source_name: str = "file") -> ImportResult:
    """Read QuPath GeoJSON (FeatureCollection, a Feature, or a list of Features)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{source_name} is not valid JSON.") from exc
    except RecursionError as exc:  # hostile nesting
        raise AnnotationError(f"{source_name} is nested too deeply to be an annotation file.") from exc
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features")
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        features = [obj]
    elif isinstance(obj, list):
        features = obj
    else:
        raise AnnotationError(f"{source_name} is not a GeoJSON FeatureCollection or list of Features.")
    if not isinstance(features, list):
        raise AnnotationError(f"{source_name} has no list of features.")
    out: list[Annotation] = []
    classes: dict[str, AnnotationClass] = {}
    skipped: list[str] = []
    for i, feat in enumerate(features):
        if not isinstance(feat, dict) or feat.get("type") != "Feature" or not isinstance(feat.get("geometry"), dict):
            skipped.append(f"feature {i}: not a GeoJSON Feature with a geometry")
            continue
        gtype = feat["geometry"].get("type")
        if gtype not in SUPPORTED_GEOMETRIES:
            skipped.append(f"feature {i}: geometry type {gtype!r} is not supported")
            continue
        try:
            geom = shape(feat["geometry"])
        except (ValueError, TypeError, AttributeError, shapely.errors.GEOSException) as exc:
            skipped.append(f"feature {i}: invalid {gtype} ({exc})")
            continue
        if geom.is_empty:
            skipped.append(f"feature {i}: empty geometry")
            continue
        if not _plausible(shapely.get_coordinates(geom)):
            skipped.append(f"feature {i}: coordinates that are not finite or lie far outside any slide")
            continue
        if gtype in ("Polygon", "MultiPolygon") and not geom.is_valid:
            geom = shapely.make_valid(geom)
        props = feat.get("properties") or {}
        if props.get("objectType", "annotation") != "annotation":
            skipped.append(f"feature {i}: QuPath {props.get('objectType')} objects are not annotations")
            continue
        cls_obj = props.get("classification") or {}
        cls_name = str(cls_obj.get("name") or "Other") if isinstance(cls_obj, dict) else "Other"
        color = cls_obj.get("color") if isinstance(cls_obj, dict) else None
        if isinstance(color, list) and len(color) == 3 and cls_name not in classes:
            classes[cls_name] = AnnotationClass(cls_name, tuple(int(c) for c in color))  # type: ignore[arg-type]
        source = props.get("source") if props.get("source") in ("manual", "model") else "manual"
        ann_id = str(feat.get("id") or props.get("id") or "") or None
        kwargs: dict[str, Any] = {"id": ann_id} if ann_id else {}
        out.append(Annotation(geometry=geom, cls=cls_name, name=str(props.get("name") or ""),
                              note=str(props.get("note") or ""), source=source, **kwargs))
    return ImportResult(out, list(classes.values()), skipped)


#: Level-0 coordinates beyond this magnitude lie outside any slide we open (10x its largest side).
MAX_COORD_L0 = 10 * MAX_SIDE_L0


def _plausible(xy: Any) -> bool:
    """Finite coordinates that can lie on a slide (hostile files carry NaN or 1e300)."""
    a = np.asarray(xy, np.float64)
    return bool(np.isfinite(a).all() and (np.abs(a) <= MAX_COORD_L0).all())


# -- ASAP XML -------------------------------------------------------------------------------
def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def _rgb(text: str | None) -> tuple[int, int, int] | None:
    try:
        v = int(str(text).lstrip("#"), 16)
        return (v >> 16) & 255, (v >> 8) & 255, v & 255
    except ValueError:
        return None


def dumps_asap(annotations: Sequence[Annotation], store: AnnotationStore | None = None) -> bytes:
    """ASAP XML. ASAP polygons have no holes: each polygon part is written by its outer ring and
    each hole as its own polygon in the group "<class> hole" (read back as holes by
    :func:`parse_asap`; other readers see the holes as separate regions, never lose them)."""
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    groups: dict[str, tuple[int, int, int]] = {}
    for a in annotations:
        color = store.color(a.cls) if store is not None else (255, 0, 0)
        groups[a.cls] = color
        parts = list(getattr(a.geometry, "geoms", [a.geometry]))
        name = a.name or a.id
        for k, part in enumerate(parts):
            pname = name if len(parts) == 1 else f"{name} [{k + 1}]"
            if part.geom_type == "Polygon":
                _asap_element(anns, pname, "Polygon", a.cls, color, list(part.exterior.coords)[:-1])
                for h, ring in enumerate(part.interiors):
                    groups[a.cls + HOLE_SUFFIX] = color
                    _asap_element(anns, f"{pname} hole {h + 1}", "Polygon", a.cls + HOLE_SUFFIX, color,
                                  list(ring.coords)[:-1])
            elif part.geom_type == "Point":
                _asap_element(anns, pname, "Dot", a.cls, color, [(part.x, part.y)])
            else:
                _asap_element(anns, pname, "PointSet", a.cls, color, list(part.coords))
    grp = ET.SubElement(root, "AnnotationGroups")
    for name, color in groups.items():
        g = ET.SubElement(grp, "Group", Name=name, PartOfGroup="None", Color=_hex(color))
        ET.SubElement(g, "Attributes")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _asap_element(parent: ET.Element, name: str, atype: str, group: str, color: tuple[int, int, int],
                  coords: list[Any]) -> None:
    el = ET.SubElement(parent, "Annotation", Name=name, Type=atype, PartOfGroup=group, Color=_hex(color))
    cs = ET.SubElement(el, "Coordinates")
    for order, (x, y) in enumerate(coords):
        ET.SubElement(cs, "Coordinate", Order=str(order), X=repr(float(x)), Y=repr(float(y)))


def _cut_holes(annotations: list[Annotation], holes: list[tuple[str, Any]]) -> list[Annotation]:
    """Subtract each "<class> hole" polygon from the regions of its class that contain it."""
    out = list(annotations)
    for cls, hole in holes:
        for i, a in enumerate(out):
            if a.cls == cls and a.geometry.geom_type in ("Polygon", "MultiPolygon") and a.geometry.contains(hole):
                out[i] = replace(a, geometry=a.geometry.difference(hole))
                break
    return out


def parse_asap(data: bytes | str, source_name: str = "file") -> ImportResult:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise AnnotationError(f"{source_name} is not valid XML.") from exc
    except RecursionError as exc:
        raise AnnotationError(f"{source_name} is nested too deeply to be an annotation file.") from exc
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(f"{source_name} is not an ASAP annotation file.")
    classes = {}
    for g in root.iter("Group"):
        color = _rgb(g.get("Color"))
        if g.get("Name") and color:
            classes[g.get("Name")] = AnnotationClass(g.get("Name"), color)
    out, skipped = [], []
    holes: list[tuple[str, Any]] = []
    for i, el in enumerate(root.iter("Annotation")):
        try:
            pts = sorted((int(c.get("Order", "0")), float(c.get("X")), float(c.get("Y")))
                          for c in el.iter("Coordinate"))
        except (TypeError, ValueError):
            skipped.append(f"annotation {i}: bad coordinates")
            continue
        xy = [(x, y) for _o, x, y in pts]
        if not _plausible(xy):
            skipped.append(f"annotation {i}: coordinates that are not finite or lie far outside any slide")
            continue
        atype = el.get("Type", "Polygon")
        if atype in ("Polygon", "Rectangle", "Spline") and len(xy) >= 3:
            geom = shapely.Polygon(xy)
            if not geom.is_valid:
                geom = shapely.make_valid(geom)
        elif atype == "Dot" and len(xy) == 1:
            geom = shapely.Point(xy[0])
        elif atype == "PointSet" and xy:
            geom = shapely.MultiPoint(xy) if len(xy) > 1 else shapely.Point(xy[0])
        else:
            skipped.append(f"annotation {i}: type {atype!r} with {len(xy)} points is not supported")
            continue
        cls = el.get("PartOfGroup") or "Other"
        if cls == "None":
            cls = "Other"
        if cls.endswith(HOLE_SUFFIX) and geom.geom_type == "Polygon":
            holes.append((cls[: -len(HOLE_SUFFIX)], geom))
            continue
        if cls not in classes and _rgb(el.get("Color")):
            classes[cls] = AnnotationClass(cls, _rgb(el.get("Color")))  # type: ignore[arg-type]
        out.append(Annotation(geometry=geom, cls=cls, name=el.get("Name", "")))
    classes = {k: v for k, v in classes.items() if not k.endswith(HOLE_SUFFIX)}
    return ImportResult(_cut_holes(out, holes), list(classes.values()), skipped)


def read_file(path: str | os.PathLike[str]) -> ImportResult:
    """Import GeoJSON (.geojson/.json) or ASAP XML (.xml); one-sentence errors.

    A file with shapes none of which can be used is an error (naming the first reason); a file
    with no shapes at all is not (an empty export).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AnnotationError(f"{path.name} cannot be read.") from exc
    if path.suffix.lower() == ".xml" or data.lstrip().startswith(b"<"):
        result = parse_asap(data, path.name)
    else:
        result = parse_geojson(data, path.name)
    if result.skipped and not result.annotations:
        raise AnnotationError(f"{path.name} holds no annotation that can be used ({result.skipped[0]}).")
    return result


# -- autosave -------------------------------------------------------------------------------
def user_store_dir() -> Path:
    base = os.environ.get("IDC_VIEWER_DATA") or os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "idc-viewer" / "annotations"


def autosave_path(slide_path: Path, fingerprint: str) -> Path:
    """Beside the slide when its folder is writable, else in the per-user store."""
    beside = slide_path.with_name(slide_path.name + ".annotations.geojson")
    if os.access(slide_path.parent, os.W_OK) and (not beside.exists() or os.access(beside, os.W_OK)):
        return beside
    return user_store_dir() / f"{slide_path.stem}-{fingerprint}.geojson"


def save_store(path: Path, store: AnnotationStore) -> None:
    write_bytes(path, dumps_geojson(store.items, store))


def _identity(a: Annotation) -> tuple[str, bytes]:
    """Class and geometry (normalised, to 1e-6 px) of an annotation: what makes two the same region."""
    return a.cls, shapely.set_precision(shapely.normalize(a.geometry), 1e-6).wkb


def load_into(store: AnnotationStore, result: ImportResult, replace_all: bool = False) -> int:
    """Add imported annotations (or replace all); returns how many were added. An annotation
    with the same class and geometry as one already there is not added again."""
    for c in result.classes:
        store.ensure_class(c.name, c.color)
    if replace_all:
        store.replace_all(result.annotations)
        return len(result.annotations)
    seen = {_identity(a) for a in store.items}
    new = []
    for a in result.annotations:
        key = _identity(a)
        if key not in seen:
            seen.add(key)
            new.append(a)
    if new:
        store.add(*new)
    return len(new)
