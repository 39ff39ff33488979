"""Annotation tools in the real view: draw, select, edit, undo, list, autosave, import, regions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PySide6.QtCore import QPoint, Qt

from inference.annotation_io import parse_geojson
from inference.heatmap import Heatmap, HeatmapInfo
from inference.patches import PatchGrid
from tests.conftest import CMU_SVS
from tests.viewer.conftest import show_window
from viewer.main_window import MainWindow


@pytest.fixture
def slide_copy(tmp_path: Path) -> Path:
    """The real Aperio slide in a writable temporary folder (autosave goes beside it)."""
    dst = tmp_path / CMU_SVS.name
    shutil.copy(CMU_SVS, dst)
    return dst


@pytest.fixture
def window(qtbot, tmp_path: Path, slide_copy: Path) -> MainWindow:
    w = show_window(qtbot, tmp_path, 1000, 800)
    assert w.open_path(slide_copy)
    return w


def vp(window: MainWindow):
    return window.view.viewport()


def to_view(window: MainWindow, x_l0: float, y_l0: float) -> QPoint:
    return window.view.mapFromScene(x_l0, y_l0)


def drag(qtbot, window: MainWindow, pts: list[tuple[float, float]]) -> None:
    qtbot.mousePress(vp(window), Qt.MouseButton.LeftButton, pos=to_view(window, *pts[0]))
    for p in pts[1:]:
        qtbot.mouseMove(vp(window), to_view(window, *p))
    qtbot.mouseRelease(vp(window), Qt.MouseButton.LeftButton, pos=to_view(window, *pts[-1]))


def use(window: MainWindow, tool: str) -> None:
    window.tool_actions[tool].trigger()


def test_rectangle_polygon_point_freehand_brush(qtbot, window: MainWindow) -> None:
    store = window.annotations.store
    use(window, "rectangle")
    drag(qtbot, window, [(400, 400), (800, 700), (1000, 1000)])
    assert len(store) == 1
    rect = store.items[0]
    assert rect.geometry.geom_type == "Polygon" and rect.cls == "IDC" and rect.source == "manual"
    minx, miny, maxx, maxy = rect.geometry.bounds
    tol = 2 / window.view.scale_factor
    assert abs(minx - 400) < tol and abs(maxy - 1000) < tol

    use(window, "polygon")
    for p in [(1200, 400), (1800, 500), (1600, 1200)]:
        qtbot.mouseClick(vp(window), Qt.MouseButton.LeftButton, pos=to_view(window, *p))
    qtbot.keyClick(window.view, Qt.Key.Key_Return)
    assert len(store) == 2 and len(store.items[1].geometry.exterior.coords) == 4

    use(window, "point")
    qtbot.mouseClick(vp(window), Qt.MouseButton.LeftButton, pos=to_view(window, 500, 2000))
    assert store.items[2].geometry.geom_type == "Point"

    use(window, "freehand")
    circle = [(1000 + 300 * np.cos(t), 2200 + 300 * np.sin(t)) for t in np.linspace(0, 2 * np.pi, 40)]
    drag(qtbot, window, circle)
    assert store.items[3].geometry.area == pytest.approx(np.pi * 300**2, rel=0.1)

    window.annotation_panel.class_combo.setCurrentText("Non-IDC")
    use(window, "brush")
    drag(qtbot, window, [(200, 2600), (600, 2600), (900, 2700)])
    brush = store.items[4]
    assert brush.cls == "Non-IDC" and brush.geometry.area > 0
    assert window.annotation_panel.table.rowCount() == 5


def test_select_move_delete_and_undo_redo(qtbot, window: MainWindow) -> None:
    store = window.annotations.store
    use(window, "rectangle")
    drag(qtbot, window, [(400, 400), (1000, 1000)])
    original = store.items[0]
    use(window, "select")
    qtbot.mouseClick(vp(window), Qt.MouseButton.LeftButton, pos=to_view(window, 700, 700))
    assert window.annotations.layer.selected_ids() == [original.id]
    assert window.annotation_panel.selected_ids() == [original.id]  # list follows the view
    drag(qtbot, window, [(700, 700), (800, 750), (900, 800)])  # move by (+200, +100)
    moved = store.items[0]
    dx = moved.geometry.bounds[0] - original.geometry.bounds[0]
    assert dx == pytest.approx(200, abs=3 / window.view.scale_factor)
    window.annotations.undo()
    assert store.items[0].geometry.equals_exact(original.geometry, 0)
    window.annotations.redo()
    assert store.items[0].geometry.equals_exact(moved.geometry, 0)
    window.annotations.layer.select([original.id])
    qtbot.keyClick(window.view, Qt.Key.Key_Delete)
    assert len(store) == 0
    window.annotations.undo()
    assert len(store) == 1 and store.items[0].geometry.equals_exact(moved.geometry, 0)


def test_edit_vertex(qtbot, window: MainWindow) -> None:
    store = window.annotations.store
    use(window, "rectangle")
    drag(qtbot, window, [(400, 400), (1000, 1000)])
    use(window, "select")
    window.annotations.layer.select([store.items[0].id])
    item = window.annotations.layer.items[store.items[0].id]
    handles = item._handles
    assert len(handles) == 4
    handle = min(handles, key=lambda h: abs(h.pos().x() - 1000) + abs(h.pos().y() - 1000))
    handle.setPos(1300, 1200)
    handle.owner.vertex_moved(handle.ring, handle.index, handle.pos())
    assert (1300.0, 1200.0) in list(store.items[0].geometry.exterior.coords)


def test_list_click_goes_to_annotation_and_filter(qtbot, window: MainWindow) -> None:
    use(window, "rectangle")
    drag(qtbot, window, [(100, 2500), (300, 2700)])
    window.annotation_panel.class_combo.setCurrentText("Tissue")
    drag(qtbot, window, [(1800, 200), (2000, 400)])
    panel = window.annotation_panel
    panel._on_table_cell_clicked(0, 0)
    c = window.view.mapToScene(vp(window).rect().center())
    assert abs(c.x() - 200) < 20 and abs(c.y() - 2600) < 20
    panel.filter_combo.setCurrentText("Tissue")
    assert panel.table.rowCount() == 1
    layer = window.annotations.layer
    visible = [it.annotation.cls for it in layer.items.values() if it.isVisible()]
    assert visible == ["Tissue"]


def test_autosave_and_restore_on_reopen(qtbot, window: MainWindow, slide_copy: Path) -> None:
    use(window, "rectangle")
    drag(qtbot, window, [(400, 400), (1000, 1000)])
    saved = slide_copy.with_name(slide_copy.name + ".annotations.geojson")
    qtbot.waitUntil(saved.exists, timeout=5000)
    assert len(parse_geojson(saved.read_bytes()).annotations) == 1
    window.annotations.store.update(window.annotations.store.items[0].id, name="renamed")
    assert window.open_path(slide_copy)  # reopen: restored from the autosave
    restored = window.annotations.store.items
    assert len(restored) == 1 and restored[0].name == "renamed"
    assert not window.annotations.store.can_undo()


def test_malformed_import_keeps_annotations(qtbot, window: MainWindow, tmp_path: Path) -> None:
    use(window, "rectangle")
    drag(qtbot, window, [(400, 400), (1000, 1000)])
    before = window.annotations.store.items
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [')
    with qtbot.waitSignal(window.error_shown, timeout=2000):
        assert not window.annotations.import_file(bad)
    assert window.annotations.store.items == before
    good = tmp_path / "good.geojson"
    window.annotations.export_geojson(good)
    with qtbot.waitSignal(window.annotations.message, timeout=2000) as msg:
        assert window.annotations.import_file(good)
    assert len(window.annotations.store) == 1  # importing what is already there adds nothing
    assert "already there" in msg.args[0]
    xml = window.annotations.export_asap(tmp_path / "a.xml")
    assert window.annotations.import_file(xml) and len(window.annotations.store) == 1


def test_regions_from_heatmap_button(qtbot, window: MainWindow) -> None:
    grid = PatchGrid.build(window.slide.dimensions, window.slide.mpp, 4.0, 50)
    hm = Heatmap(HeatmapInfo(window.slide.fingerprint(), "m", grid, 0.1, 0.5), np.ones(grid.patch_shape, bool))
    rr, cc = np.nonzero(np.ones(grid.patch_shape, bool))
    hm.add(rr, cc, np.where((rr < 3) & (cc < 3), 0.9, 0.1).astype(np.float32))
    window.session.set_heatmap(hm)
    panel = window.annotation_panel
    panel.region_min_area.setValue(0.0)
    panel.regions_button.click()
    store = window.annotations.store
    assert len(store) == 1 and store.items[0].source == "model"
    assert store.items[0].area_um2(window.slide.mpp) == pytest.approx(9 * 200 * 200, rel=0.01)
    window.annotations.undo()  # one undo step removes them
    assert len(store) == 0


def test_export_crops_report_and_view(qtbot, window: MainWindow, tmp_path: Path) -> None:
    use(window, "rectangle")
    drag(qtbot, window, [(400, 400), (1000, 1000)])
    with qtbot.waitSignal(window.annotations.export_finished, timeout=30_000):
        assert window.annotations.export_crops(tmp_path / "crops", mpp_out=2.0, overlay=True)
    paths = list((tmp_path / "crops").iterdir())
    assert any(p.name.endswith(".mask.png") for p in paths) and any(p.suffix == ".json" for p in paths)
    assert window.annotations.export_report(tmp_path / "rep")


def test_crop_export_runs_as_a_job_with_progress_and_cancel(qtbot, window: MainWindow, tmp_path: Path) -> None:
    """Issue 13, item 6: 25 regions froze the app for 19.9 s; now the export is a job."""
    from shapely.geometry import box

    from inference.annotations import Annotation

    store = window.annotations.store
    for i in range(25):
        store.add(Annotation(geometry=box(40 * i, 40 * i, 40 * i + 900, 40 * i + 900), cls="IDC", name=f"r{i}"))
    panel = window.annotation_panel
    seen: list[int] = []
    window.annotations.exporter.report.connect(lambda step: seen.append(step.done))
    assert window.annotations.export_crops(tmp_path / "all", mpp_out=None, overlay=True)
    assert panel.export_bar.isVisibleTo(panel) and panel.export_bar.maximum() == 25
    qtbot.waitUntil(lambda: len(seen) >= 3, timeout=30_000)
    window.annotations.cancel_export()
    assert not panel.export_bar.isVisibleTo(panel)
    qtbot.waitUntil(lambda: window.annotations.exporter.threads() == 0, timeout=30_000)
    crops = sorted((tmp_path / "all").glob("*_r*.png"))
    assert 3 * 2 <= len(crops) < 25 * 2 and not list((tmp_path / "all").glob("*.report.json"))
    for p in crops:  # every file written before the cancel is complete
        assert Image.open(p).size[0] > 0
    # A whole export finishes with every region and the report; a request finer than the slide
    # is clamped to the slide's own resolution (never upsampled).
    with qtbot.waitSignal(window.annotations.export_finished, timeout=60_000):
        window.annotations.export_crops(tmp_path / "fine", mpp_out=window.slide.mpp / 4, overlay=False)
    assert len(list((tmp_path / "fine").glob("*_r*.mask.png"))) == 25
    first = Image.open(next((tmp_path / "fine").glob("*_r0.png")))
    assert first.size == (900, 900)


def test_ruler_visibility_fill_adjustment_and_shortcuts(qtbot, window: MainWindow) -> None:
    """What QuPath users look for (issue 13, item 12)."""
    store = window.annotations.store
    use(window, "rectangle")
    drag(qtbot, window, [(400, 400), (1000, 1000)])
    use(window, "ruler")
    drag(qtbot, window, [(100, 100), (400, 500)])  # 500 level-0 px at 0.499 um/px
    assert len(store) == 1  # a measurement is not an annotation
    line = window.view.tool.line
    tolerance = 2 / window.view.scale_factor  # mouse positions are whole screen pixels
    assert abs(line.length - 500) < 2 * tolerance
    expected = f"{line.length * window.slide.mpp:,.1f} \u00b5m"
    assert window.view.tool.label.text() == expected
    assert window.statusBar().currentMessage().startswith(f"Distance: {expected} (")
    item = next(iter(window.annotations.layer.items.values()))
    window.show_annotations_action.trigger()
    assert not item.isVisible()
    window.show_annotations_action.trigger()
    window.fill_annotations_action.trigger()
    assert item.isVisible() and not item.fill
    use(window, "pan")
    qtbot.waitUntil(window.view.is_sharp, timeout=10_000)
    before = qimage_mean(window)
    window.view.set_adjustment(-0.3, 1.0)
    assert window.view.adjustment.isEnabled()
    assert qimage_mean(window) < before - 40
    window.view.set_adjustment(0.0, 1.0)
    assert not window.view.adjustment.isEnabled() and abs(qimage_mean(window) - before) < 1
    window._on_shortcuts_triggered()
    table = window.shortcuts_dialog.table
    rows = {table.item(r, 1).text(): table.item(r, 0).text() for r in range(table.rowCount())}
    assert rows["Heatmap"] == "H" and rows["Ruler"] == "L" and rows["Show annotations"] == "A"


def qimage_mean(window: MainWindow) -> float:
    from viewer.layers import qimage_to_array

    return float(qimage_to_array(window.view.viewport().grab().toImage()).mean())
