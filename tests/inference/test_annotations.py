"""Annotations: values, undo/redo, QuPath GeoJSON and ASAP XML, autosave, crops and reports."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from inference.annotation_io import (
    autosave_path,
    dumps_asap,
    dumps_geojson,
    parse_asap,
    parse_geojson,
    read_file,
    save_store,
)
from inference.annotations import Annotation, AnnotationError, AnnotationStore, regions_from_heatmap
from inference.export import crop, export_regions, report, write_report
from inference.geometry import Rect
from inference.heatmap import Heatmap, HeatmapInfo
from inference.patches import PatchGrid
from inference.slide import open_slide
from tests.conftest import REPO
from viewer.cli import main


def sample() -> list[Annotation]:
    donut = shapely.Polygon([(100, 100), (900, 100), (900, 700), (100, 700)],
                            [[(300, 300), (500, 300), (500, 500), (300, 500)]])
    return [
        Annotation(donut, "IDC", "tumour with lumen", note="check margin"),
        Annotation(shapely.box(1000, 50, 1200, 300), "Non-IDC", "stroma", source="model"),
        Annotation(shapely.Point(640, 480), "Other", "mitosis"),
        Annotation(shapely.LineString([(10, 10), (50, 80), (90, 20)]), "Tissue", "edge"),
        Annotation(shapely.MultiPolygon([shapely.box(0, 0, 10, 10), shapely.box(20, 20, 40, 40)]), "IDC", "two"),
    ]


def test_geojson_round_trip_keeps_geometry_classes_and_fields() -> None:
    store = AnnotationStore()
    store.add(*sample())
    back = parse_geojson(dumps_geojson(store.items, store))
    assert not back.skipped
    for a, b in zip(store.items, back.annotations, strict=True):
        assert a.same_as(b)
    assert {c.name: c.color for c in back.classes}["IDC"] == store.color("IDC")


def test_asap_round_trip() -> None:
    plain = [a for a in sample() if a.geometry.geom_type in ("Polygon", "Point") and not getattr(a.geometry, "interiors", [])]
    store = AnnotationStore(plain)
    back = parse_asap(dumps_asap(plain, store))
    assert len(back.annotations) == len(plain)
    for a, b in zip(plain, back.annotations, strict=True):
        assert b.cls == a.cls and b.name == a.name
        assert a.geometry.equals(b.geometry)
    xml = dumps_asap(plain, store).decode()
    assert "<ASAP_Annotations>" in xml and 'PartOfGroup="Non-IDC"' in xml and "<AnnotationGroups>" in xml


QUPATH_05 = """{
  "type": "FeatureCollection",
  "features": [
    {"type": "Feature", "id": "6e5b3f5e-4a0e-4c55-9f59-0c7a4b3b9c11",
     "geometry": {"type": "Polygon", "coordinates": [[[1200, 800], [1600, 800], [1600, 1100], [1200, 1100], [1200, 800]]]},
     "properties": {"objectType": "annotation", "name": "Tumour 1",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]}, "isLocked": false,
                    "measurements": {"Area \\u00b5m^2": 30000.0}}},
    {"type": "Feature", "id": "0b6c1d4c-8a43-4bd4-8a3b-2f8f1d0c1a22",
     "geometry": {"type": "MultiPolygon", "coordinates": [[[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]],
                                                           [[[20, 20], [30, 20], [30, 30], [20, 30], [20, 20]]]]},
     "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "color": [150, 200, 150]}}},
    {"type": "Feature", "id": "c1", "geometry": {"type": "Point", "coordinates": [5, 6]},
     "properties": {"objectType": "annotation"}},
    {"type": "Feature", "id": "c2", "geometry": {"type": "LineString", "coordinates": [[0, 0], [4, 4]]},
     "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
    {"type": "Feature", "id": "c3", "geometry": {"type": "GeometryCollection", "geometries": []},
     "properties": {"objectType": "annotation"}},
    {"type": "Feature", "id": "d1", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
     "properties": {"objectType": "detection"}}
  ]
}"""


def test_qupath_05_geojson_imports() -> None:
    result = parse_geojson(QUPATH_05)
    names = [(a.cls, a.geometry.geom_type) for a in result.annotations]
    assert names == [("Tumor", "Polygon"), ("Stroma", "MultiPolygon"), ("Other", "Point"), ("Tumor", "LineString")]
    assert result.annotations[0].id == "6e5b3f5e-4a0e-4c55-9f59-0c7a4b3b9c11"
    assert result.annotations[0].geometry.area == 400 * 300
    assert {c.name: c.color for c in result.classes} == {"Tumor": (200, 0, 0), "Stroma": (150, 200, 150)}
    assert len(result.skipped) == 2 and "GeometryCollection" in result.skipped[0]
    as_list = parse_geojson(json.dumps(json.loads(QUPATH_05)["features"][:1]))  # QuPath's plain array
    assert len(as_list.annotations) == 1


@pytest.mark.parametrize("text", ["{not json", '{"type": "Topology"}', "<xml/>", '{"type": "FeatureCollection", "features": 3}'])
def test_malformed_files_raise_one_sentence(tmp_path: Path, text: str) -> None:
    p = tmp_path / "bad.geojson"
    p.write_text(text)
    with pytest.raises(AnnotationError) as info:
        read_file(p)
    assert str(info.value).endswith(".") and "\n" not in str(info.value)


def test_a_new_class_has_the_same_colour_in_every_process() -> None:
    """A class made without a colour (a new name in the panel, an ASAP file without colours) is
    drawn and exported in a colour that follows from its name, whatever the process's hash seed."""
    code = ("from inference.annotations import AnnotationStore; s = AnnotationStore(); "
            "s.ensure_class('Necrosis'); print(s.color('Necrosis'))")
    colours = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout for seed in ("1", "2", "3")}
    assert len(colours) == 1
    store = AnnotationStore()
    store.ensure_class("Necrosis")
    assert colours == {f"{store.color('Necrosis')}\n"}


def test_undo_redo_restores_state_exactly() -> None:
    store = AnnotationStore()
    seen = []
    store.subscribe(lambda: seen.append(len(store)))
    a, b, *_ = sample()
    store.add(a)
    store.add(b)
    s2 = store.items
    store.update(a.id, cls="Non-IDC", geometry=shapely.affinity.translate(a.geometry, 50, 0))
    s3 = store.items
    store.remove(b.id)
    store.undo()
    assert store.items == s3 and all(x.same_as(y) for x, y in zip(store.items, s3, strict=True))
    store.undo()
    assert all(x.same_as(y) for x, y in zip(store.items, s2, strict=True))
    store.redo()
    assert all(x.same_as(y) for x, y in zip(store.items, s3, strict=True))
    store.add(sample()[2])
    assert not store.can_redo()  # a new edit drops the redo branch
    assert seen == [1, 2, 2, 1, 2, 2, 2, 3]


def test_areas_in_um2(slide_mpp) -> None:
    path, _ = slide_mpp
    with open_slide(path) as slide:  # 0.5 um per pixel
        a = Annotation(shapely.box(0, 0, 200, 100))
        assert a.area_um2(slide.mpp) == pytest.approx(200 * 100 * 0.25)
        assert a.area_um2(None) is None
        rep = report([a], slide, None)
    assert rep["totals"]["idc_area_um2"] == pytest.approx(5000.0)


def test_report_totals_are_union_areas_and_csv_is_plain(slide_mpp, tmp_path) -> None:
    path, _ = slide_mpp
    big = Annotation(shapely.box(0, 0, 4000, 2000), "IDC", "big")  # 2,000,000 um2 at 0.5 um/px
    overlap = Annotation(shapely.box(2000, 0, 6000, 2000), "IDC", "overlap")  # half inside big
    other = Annotation(shapely.box(0, 0, 100, 100), "Non-IDC", "n")
    with open_slide(path) as slide:
        rep = report([big, overlap, other], slide, None)
    t = rep["totals"]
    assert [r["area_um2"] for r in rep["regions"]] == pytest.approx([2e6, 2e6, 2500])  # rows unchanged
    assert t["idc_area_um2"] == pytest.approx(3e6) and t["idc_area_mm2"] == pytest.approx(3.0)  # not 4
    assert t["area_um2_by_class"] == pytest.approx({"IDC": 3e6, "Non-IDC": 2500})
    _, csv_path = write_report(rep, tmp_path, "s")
    rows = list(csv.reader(csv_path.open()))
    assert rows[0][0] == "id" and len(rows) == 4 and all(len(r) == 8 for r in rows)  # no footer row
    assert rows[1][5] == "2000000" and "e+" not in csv_path.read_text()


def test_crop_equals_direct_read_and_mask(slide_mpp) -> None:
    path, img = slide_mpp
    poly = shapely.Polygon([(100, 200), (500, 200), (300, 600)])
    with open_slide(path) as slide:
        rgb, mask, bbox = crop(slide, Annotation(poly), scale=1.0)
        assert bbox == Rect(100, 200, 400, 400)
        np.testing.assert_array_equal(rgb, slide.read(bbox, (400, 400)))
        np.testing.assert_array_equal(rgb, img[200:600, 100:500])
        half, _m, _b = crop(slide, Annotation(poly), scale=0.5)  # --mpp-out 1.0 on a 0.5 um slide
        assert half.shape == (200, 200, 3)
    assert mask[5, 200] == 255 and mask[390, 10] == 0 and mask[390, 390] == 0
    assert abs(mask.astype(bool).sum() - poly.area) / poly.area < 0.02


def test_regions_from_heatmap_keep_holes_and_follow_the_grid() -> None:
    grid = PatchGrid.build((1000, 1000), 1.0, 4.0, 50)  # 200 px cells, 5 x 5
    hm = Heatmap(HeatmapInfo("s", "m", grid, 0.1, threshold=0.5), np.ones((5, 5), bool))
    p = np.zeros((5, 5), np.float32)
    p[0:3, 0:3] = 0.9
    p[1, 1] = 0.1  # a hole
    p[4, 4] = 0.8  # a one-cell island
    rr, cc = np.nonzero(np.ones((5, 5), bool))
    hm.add(rr, cc, p[rr, cc])
    regions = regions_from_heatmap(hm, 0.5, min_area_um2=50_000, mpp=1.0)
    assert len(regions) == 1  # the island (40,000 um2) is below the minimum area
    ring = regions[0].geometry
    assert ring.area == 8 * 200 * 200 and len(ring.interiors) == 1
    assert len(ring.exterior.coords) == 5  # a square: corners only, no staircase of collinear points
    assert regions[0].source == "model" and regions[0].cls == "IDC"
    mean, frac = regions[0].heatmap_stats(hm)
    assert mean == pytest.approx(0.9) and frac == 1.0


def test_autosave_beside_slide_or_in_user_store(tmp_path: Path, monkeypatch) -> None:
    slide = tmp_path / "s.svs"
    slide.write_bytes(b"x")
    assert autosave_path(slide, "fp") == tmp_path / "s.svs.annotations.geojson"
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "s.svs").write_bytes(b"x")
    monkeypatch.setenv("IDC_VIEWER_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro)
    assert autosave_path(ro / "s.svs", "fp").parent == tmp_path / "data" / "idc-viewer" / "annotations"


def test_killed_mid_save_leaves_previous_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "ann.geojson"
    store = AnnotationStore(sample()[:2])
    save_store(target, store)
    before = target.read_bytes()
    script = f"""
import os, time, shapely, sys
sys.path.insert(0, {str(REPO)!r})
from inference.annotations import Annotation, AnnotationStore
from inference.annotation_io import save_store
big = AnnotationStore([Annotation(shapely.box(i, i, i + 5, i + 5)) for i in range(20000)])
real_fsync = os.fsync
def slow_fsync(fd):
    print("writing", flush=True)
    time.sleep(30)
os.fsync = slow_fsync
save_store(__import__("pathlib").Path({str(target)!r}), big)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # inside the write, before the rename
    proc.kill()
    proc.wait()
    assert target.read_bytes() == before
    assert len(parse_geojson(target.read_bytes()).annotations) == 2


def test_export_cli_writes_crops_masks_and_report(tmp_path: Path, slide_mpp) -> None:
    path, _ = slide_mpp
    ann = tmp_path / "a.geojson"
    store = AnnotationStore([Annotation(shapely.box(100, 100, 500, 300), "IDC", "t1"),
                             Annotation(shapely.box(600, 600, 700, 900), "Non-IDC", "s1")])
    save_store(ann, store)
    out = tmp_path / "out"
    assert main(["export", str(path), "--annotations", str(ann), "--out", str(out), "--mpp-out", "1.0",
                 "--overlay"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 4 and sum(n.endswith(".mask.png") for n in pngs) == 2
    first = np.asarray(Image.open(next(out.glob("*_001_IDC_t1.png"))))
    assert first.shape == (100, 200, 3)  # 400 x 200 level-0 px at 0.5 um -> 1 um
    rep = json.loads((out / "with_mpp.report.json").read_text())
    assert rep["totals"]["idc_area_um2"] == pytest.approx(400 * 200 * 0.25)
    assert (out / "with_mpp.report.csv").read_text().startswith("id,name,class,source")
    with open_slide(path) as slide:
        assert len(export_regions(slide, store.items, tmp_path / "o2")) == 6


def test_export_cli_bad_annotation_file(tmp_path: Path, slide_mpp, capsys) -> None:
    bad = tmp_path / "bad.geojson"
    bad.write_text("{oops")
    assert main(["export", str(slide_mpp[0]), "--annotations", str(bad), "--out", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_asap_export_keeps_holes_and_reimport_does_not_duplicate(tmp_path) -> None:
    from inference.annotation_io import (
        dumps_asap,
        dumps_geojson,
        load_into,
        parse_asap,
        parse_geojson,
    )

    outer = shapely.box(0, 0, 1000, 1000)
    holed = Annotation(outer.difference(shapely.box(200, 200, 400, 400)).difference(shapely.box(600, 600, 700, 700)),
                       "IDC", "r")
    plain = Annotation(shapely.box(2000, 0, 2100, 100), "Non-IDC", "p")
    back = parse_asap(dumps_asap([holed, plain]))
    assert len(back.annotations) == 2 and {c.name for c in back.classes} == {"IDC", "Non-IDC"}
    got = {a.cls: a for a in back.annotations}
    assert got["IDC"].geometry.area == pytest.approx(holed.geometry.area)  # 1e6 - 4e4 - 1e4, not 1e6
    assert len(got["IDC"].geometry.interiors) == 2
    store = AnnotationStore()
    data = dumps_geojson([holed, plain])
    assert load_into(store, parse_geojson(data)) == 2
    assert load_into(store, parse_geojson(data)) == 0 and len(store.items) == 2  # same file again
    moved = Annotation(shapely.affinity.translate(plain.geometry, 5, 0), "Non-IDC", "p")
    assert load_into(store, parse_geojson(dumps_geojson([moved]))) == 1  # a different region is added
