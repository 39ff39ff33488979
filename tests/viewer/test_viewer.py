from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QWheelEvent

from inference.geometry import Rect
from inference.slide import open_slide
from inference.tiles import TileGrid, TileKey
from tests.conftest import CMU_SVS, DEMO, REPO
from tests.viewer.conftest import show_window
from viewer.layers import TileLayer, rect_from_qrectf
from viewer.main_window import MainWindow
from viewer.slide_view import format_length, nice_length
from viewer.workers import TileLoader


@pytest.fixture
def window(qtbot, tmp_path: Path) -> MainWindow:
    return show_window(qtbot, tmp_path, 1000, 700)


def open_and_wait(qtbot, window: MainWindow, path: Path, **kw) -> None:
    with qtbot.waitSignal(window.view.became_sharp, timeout=20_000):
        assert window.open_path(path, **kw)


def tissue_fraction(rgb: np.ndarray) -> float:
    """Share of pixels that look like H&E stain (saturated pink/purple)."""
    arr = rgb.astype(int)
    sat = arr.max(axis=2) - arr.min(axis=2)
    return float(((sat > 40) & (arr[..., 1] < arr[..., 0])).mean())


def test_opens_demo_and_becomes_sharp(qtbot, window: MainWindow) -> None:
    open_and_wait(qtbot, window, DEMO)
    assert window.view.is_sharp()
    img = window.view.grab().toImage()
    from viewer.layers import qimage_to_array

    assert tissue_fraction(qimage_to_array(img)) > 0.2
    window._on_view_cursor_moved(100, 50)
    assert window.pos_label.text().startswith("x 100  y 50 px") and "(400.0, 200.0 \u00b5m)" in window.pos_label.text()
    assert window.recent_files()[0] == str(DEMO.resolve())


def test_zoom_keys_wheel_and_fit(qtbot, window: MainWindow) -> None:
    open_and_wait(qtbot, window, CMU_SVS)
    view = window.view
    fit = view.scale_factor
    qtbot.keyClick(view, Qt.Key.Key_Plus)
    assert view.scale_factor == pytest.approx(fit * 1.5)
    centre = view.viewport().rect().center()
    anchor = view.mapToScene(centre)
    ev = QWheelEvent(QPointF(centre), QPointF(view.mapToGlobal(centre)), QPoint(0, 0), QPoint(0, 240),
                     Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    view.wheelEvent(ev)
    assert view.scale_factor == pytest.approx(fit * 1.5 * 1.25**2)
    after = view.mapToScene(centre)
    assert abs(after.x() - anchor.x()) < 2 and abs(after.y() - anchor.y()) < 2  # zoom about cursor
    before = view.view_rect_l0()
    qtbot.keyClick(view, Qt.Key.Key_Right)
    assert view.view_rect_l0().x > before.x
    qtbot.keyClick(view, Qt.Key.Key_0)
    assert view.scale_factor == pytest.approx(fit, rel=0.01)
    with qtbot.waitSignal(view.became_sharp, timeout=20_000):
        view.set_scale(1.0)
    assert view.is_sharp()


def test_magnification_presets_follow_mpp(qtbot, window: MainWindow) -> None:
    open_and_wait(qtbot, window, CMU_SVS)
    window.set_magnification(10.0)
    assert window.view.magnification() == pytest.approx(10.0)
    assert window.view.scale_factor == pytest.approx(10 * 0.499 / 10)
    assert window.mag_menu.isEnabled()
    assert "10.00x" in window.zoom_label.text()


def test_slide_without_mpp(qtbot, window: MainWindow, slide_no_mpp) -> None:
    path, _ = slide_no_mpp
    open_and_wait(qtbot, window, path)
    assert window.view.magnification() is None
    assert not window.mag_menu.isEnabled()
    assert "unknown" in window.zoom_label.text()
    window._on_view_cursor_moved(10, 10)
    assert "unknown" in window.pos_label.text()
    window.set_mpp(0.25)
    assert window.slide.mpp == 0.25 and window.mag_menu.isEnabled()
    assert window.view.magnification() == pytest.approx(10 * window.view.scale_factor / 0.25)
    window._on_view_cursor_moved(400, 800)
    assert "(100.0, 200.0 \u00b5m)" in window.pos_label.text()


@pytest.mark.parametrize("content", [b"", b"random" * 999, None])
def test_bad_file_keeps_current_slide(qtbot, window: MainWindow, tmp_path: Path, content: bytes | None) -> None:
    open_and_wait(qtbot, window, CMU_SVS)
    bad = tmp_path / "bad.svs"
    if content is not None:
        bad.write_bytes(content)
    with qtbot.waitSignal(window.error_shown, timeout=5000) as sig:
        assert not window.open_path(bad)
    assert sig.args[0].endswith(".") and "\n" not in sig.args[0]
    assert window.slide is not None and window.slide.path == CMU_SVS
    with qtbot.waitSignal(window.view.became_sharp, timeout=20_000):
        window.view.zoom_by(2.0)  # the open slide is still fully usable


def test_overview_click_navigates(qtbot, window: MainWindow) -> None:
    open_and_wait(qtbot, window, DEMO)
    window.view.set_scale(1.0)
    ov = window.overview
    r = ov._image_rect()
    qtbot.mouseClick(ov, Qt.MouseButton.LeftButton, pos=QPoint(int(r.x() + r.width() * 0.25), int(r.y() + r.height() * 0.75)))
    c = window.view.mapToScene(window.view.viewport().rect().center())
    w, h = window.slide.dimensions
    assert abs(c.x() - 0.25 * w) < 0.05 * w and abs(c.y() - 0.75 * h) < 0.05 * h


def test_switching_slides_and_close_stop_tile_reads(qtbot, window: MainWindow) -> None:
    open_and_wait(qtbot, window, DEMO)
    window.view.set_scale(1.0)
    open_and_wait(qtbot, window, CMU_SVS)
    assert window.slide.path == CMU_SVS
    window.close()
    assert window.view.loader is None


def test_loader_merges_duplicates_and_drops_stale(qtbot, slide_mpp) -> None:
    path, _ = slide_mpp
    slide = open_slide(path)
    grid = TileGrid("s", slide.dimensions)
    loader = TileLoader(slide, grid, threads=1)
    loaded: list[TileKey] = []
    loader.tile_loaded.connect(lambda k, a: loaded.append(k))
    keys = [TileKey("s", 0, r, c) for r in range(4) for c in range(5)]
    loader.pool.setMaxThreadCount(1)
    assert loader.request(keys[0]) is True
    assert loader.request(keys[0]) is False  # merged with the one in flight
    for k in keys[1:]:
        loader.request(k)
    loader.new_generation()  # the user zoomed on: queued reads are stale
    loader.pool.waitForDone()
    qtbot.wait(50)
    assert len(loaded) < len(keys)
    assert loaded.count(keys[0]) <= 1
    assert loader.pending() == 0
    loader.shutdown()
    slide.close()


def test_scale_bar_lengths() -> None:
    assert nice_length(173) == 100 and nice_length(480) == 200 and nice_length(999) == 500
    assert format_length(2000) == "2 mm" and format_length(50) == "50 \u00b5m"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "viewer.cli", *args], capture_output=True, text=True,
                          timeout=180, cwd=REPO, env={**os.environ, **(env or {})})


def test_screenshot_cli_and_bad_slide(tmp_path: Path) -> None:
    out = tmp_path / "shot.png"
    r = _cli(str(CMU_SVS), "--screenshot", str(out), "--size", "900x700")
    assert r.returncode == 0, r.stderr
    assert tissue_fraction(np.asarray(Image.open(out).convert("RGB"))) > 0.1
    bad = tmp_path / "zero.svs"
    bad.write_bytes(b"")
    r = _cli(str(bad), "--screenshot", str(tmp_path / "x.png"))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("idc-viewer: error:")
    assert "Traceback" not in r.stderr


def test_screenshot_without_any_display_renders_off_screen(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    out = tmp_path / "headless.png"
    r = subprocess.run([sys.executable, "-m", "viewer.cli", str(CMU_SVS), "--screenshot", str(out), "--size", "800x600"],
                       capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    assert tissue_fraction(np.asarray(Image.open(out).convert("RGB"))) > 0.1
    r = subprocess.run([sys.executable, "-m", "viewer.cli", str(CMU_SVS)], capture_output=True, text=True,
                       timeout=60, cwd=REPO, env=env)
    assert r.returncode == 2 and r.stderr.strip().startswith("idc-viewer: error: no display")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.xvfb
def test_real_x11_window_shows_tissue(tmp_path: Path) -> None:
    """A real X11 window under Xvfb (not the offscreen platform)."""
    if shutil.which("xvfb-run") is None:
        if os.environ.get("CI"):
            pytest.fail("xvfb-run is missing: .ci/run must install the xvfb package")
        pytest.skip("xvfb-run is not installed")
    out = tmp_path / "x11.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb"}
    r = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable, "-m", "viewer.cli",
                        "--screenshot", str(out)], capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    assert tissue_fraction(np.asarray(Image.open(out).convert("RGB"))) > 0.15


def test_painting_does_not_leak_references_to_none(qtbot, window: MainWindow) -> None:
    """Some PySide6 builds drop a reference to None per void call; that crashes long sessions."""
    open_and_wait(qtbot, window, CMU_SVS)
    view = window.view
    view.viewport().repaint()
    before = sys.getrefcount(None)
    for _ in range(200):
        view.viewport().repaint()
    assert abs(sys.getrefcount(None) - before) < 100


def test_drop_a_slide_file_opens_it(qtbot, window: MainWindow) -> None:
    from PySide6.QtCore import QMimeData, QUrl
    from PySide6.QtGui import QDropEvent

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(CMU_SVS))])
    ev = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                    Qt.KeyboardModifier.NoModifier)
    with qtbot.waitSignal(window.session.slide_changed, timeout=5000):
        window.dropEvent(ev)
    assert window.slide.path == CMU_SVS


def test_tiles_arriving_together_are_drawn_together(qtbot, window: MainWindow, monkeypatch) -> None:
    """Tiles loaded after a jump are repainted in batches, not once per tile, and the last batch
    as soon as the view is sharp, not when its interval falls due."""
    open_and_wait(qtbot, window, DEMO)
    view = window.view
    view._repaint.setInterval(60_000)  # longer than the wait below: only the flush at sharp repaints
    repaints: list[tuple[int, Rect]] = []  # (tiles arrived by then, level-0 area)
    arrived: list[TileKey] = []
    monkeypatch.setattr(TileLayer, "update", lambda self, r: repaints.append((len(arrived), rect_from_qrectf(r))))
    view.loader.tile_loaded.connect(lambda key, arr: arrived.append(key))
    with qtbot.waitSignal(view.became_sharp, timeout=20_000):
        view.set_scale(1.0)
        view.center_on_l0(2600, 1900)
    assert len(arrived) >= 6
    assert len(repaints) == 1, "tiles were repainted one by one, or not at all, before the view was sharp"
    n, area = repaints[0]
    assert n == len(arrived)
    for key in arrived:
        tile = view.tiles.grid.rect(key)
        assert area.intersect(tile) == tile
