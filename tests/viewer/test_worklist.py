"""Worklist: a folder's slides, positive calls first, out-of-domain slides apart; open with the
heatmap; compute missing; cancel."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from inference.geometry import Rect
from inference.model import load_checkpoint
from inference.predict import PredictSettings
from inference.slide import open_slide
from inference.tiff_writer import write_pyramid_from_array
from resources import shipped_model_path
from tests.conftest import CMU_SVS, DEMO
from tests.viewer.conftest import show_window
from viewer.cli import main
from viewer.main_window import MainWindow


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two real-tissue crops of the demo slide with a cohort.csv from `predict` (one of tumour, one
    of fat and stroma), one without any heatmap (the CMU skin slide, outside the model's domain),
    and a broken file."""
    d = tmp_path / "cases"
    d.mkdir()
    with open_slide(DEMO) as s:
        for name, (x, y) in {"tumour.tif": (2400, 1500), "edge.tif": (200, 1900)}.items():
            write_pyramid_from_array(d / name, s.read(Rect(x, y, 400, 300), (400, 300)), 4.0, downsamples=(1, 4))
    assert main(["predict", str(d / "tumour.tif"), str(d / "edge.tif"), "--out", str(d / "heatmaps")]) == 0
    shutil.copy(CMU_SVS, d / "cmu.svs")
    (d / "broken.svs").write_bytes(b"\0" * 4096)
    return d


@pytest.fixture
def window(qtbot, tmp_path: Path, monkeypatch) -> MainWindow:
    monkeypatch.setenv("IDC_VIEWER_CACHE", str(tmp_path / "cache"))
    w = show_window(qtbot, tmp_path, 1200, 800, model=load_checkpoint(shipped_model_path()), device="cpu")
    w.inference.settings = PredictSettings(batch_size=64)
    return w


def names_in_order(window: MainWindow) -> list[str]:
    t = window.worklist.table
    return [t.item(r, 1).text() for r in range(t.rowCount())]


def test_worklist_ranks_by_call_opens_computes_and_cancels(qtbot, window: MainWindow, folder: Path) -> None:
    tab = window.worklist
    assert window.open_folder(folder) == 4
    assert window.tabs.currentWidget() is tab
    qtbot.waitUntil(lambda: all(r.dimensions or r.status == "unreadable" for r in tab.rows), timeout=60_000)
    rows = {r.path.name: r for r in tab.rows}
    assert rows["tumour.tif"].status == rows["edge.tif"].status == "computed"  # from cohort.csv
    assert rows["cmu.svs"].status == "not computed" and rows["broken.svs"].status == "unreadable"
    assert (rows["tumour.tif"].slide_call, rows["edge.tif"].slide_call) == ("IDC found", "no IDC found")
    assert rows["tumour.tif"].slide_score > rows["edge.tif"].slide_score and rows["edge.tif"].idc_fraction == 0
    order = names_in_order(window)
    assert order[:2] == ["tumour.tif", "edge.tif"]  # positive calls first
    tab.table.sortItems(1)  # by name, then back to the default order
    assert names_in_order(window) == sorted(order)
    tab.sort_by_priority()
    # Compute the one missing heatmap in the background, cancel once, then let it finish.
    tab.compute_missing()
    assert tab.cancel_button.isEnabled()
    tab.cancel()
    qtbot.waitUntil(lambda: tab.computer.threads() == 0, timeout=60_000)
    assert not tab.cancel_button.isEnabled() and {r.path.name: r for r in tab.rows}["cmu.svs"].status != "computed"
    with qtbot.waitSignal(tab.computer.finished, timeout=120_000):
        tab.compute_missing()
    cmu = {r.path.name: r for r in tab.rows}["cmu.svs"]
    assert cmu.status == "computed" and cmu.out_of_domain and cmu.slide_call == "uncertain"
    # The skin slide is marked and not ranked by its burden: after every in-domain slide.
    assert names_in_order(window) == ["tumour.tif", "edge.tif", "cmu.svs", "broken.svs"]
    call_item = tab.table.item(2, 5)
    assert call_item.text().startswith("\u26a0 out of domain") and "not ranked" in call_item.toolTip()
    # Double-click opens the slide with its heatmap at once (cached); Alt+Down walks the list.
    cmu_row = names_in_order(window).index("cmu.svs")
    tab.open_row(cmu_row)
    assert window.slide.path.name == "cmu.svs" and window.tabs.currentWidget() is window.view
    assert window.inference.heatmap is not None and window.inference.heatmap.complete
    assert not window.inference.runner.running()
    tab.open_row(0)
    assert window.slide.path.name == names_in_order(window)[0]
    tab.step(1)
    assert window.slide.path.name == names_in_order(window)[1]
    window.close()


def test_cohort_figures_of_another_model_are_marked_and_recomputed(folder: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    from dataclasses import replace

    from inference.worklist import cohort_rows, describe, needs_heatmap

    monkeypatch.setenv("IDC_VIEWER_CACHE", str(tmp_path / "empty-cache"))  # figures from cohort.csv only
    model = load_checkpoint(shipped_model_path())
    summary = cohort_rows(folder)["tumour.tif"]
    assert describe(folder / "tumour.tif", model, summary=summary).status == "computed"
    other = replace(summary, model_id="WRN-16-2-0123456789ab")
    row = describe(folder / "tumour.tif", model, summary=other)
    assert row.status == "computed (another model)" and row.idc_fraction == summary.idc_fraction
    assert needs_heatmap(row)
