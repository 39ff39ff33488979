from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import shapely

from inference.model import load_checkpoint
from inference.predict import BatchResult, PredictSettings
from inference.truth import (
    DISAGREEMENT_CLASSES,
    agreement,
    away_from_borders,
    cell_truth,
    disagreements,
)
from resources import shipped_model_path
from tests.conftest import CMU_SVS, DEMO
from tests.viewer.conftest import show_window
from viewer.layers import geometry_path
from viewer.main_window import MainWindow


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(shipped_model_path())


@pytest.fixture
def window(qtbot, tmp_path: Path, model, monkeypatch) -> MainWindow:
    monkeypatch.setenv("IDC_VIEWER_CACHE", str(tmp_path / "cache"))  # no heatmaps from other tests
    w = show_window(qtbot, tmp_path, 1000, 700, model=model, device="cpu")
    w.inference.settings = PredictSettings(batch_size=64, first_batch=16)
    return w


def test_heatmap_fills_in_and_hover_shows_probability(qtbot, window: MainWindow, tmp_path: Path) -> None:
    assert window.open_path(CMU_SVS)
    with qtbot.waitSignal(window.inference.heatmap_finished, timeout=60_000):
        window.heatmap_action.trigger()  # H: first press computes
    hm = window.inference.heatmap
    assert hm is not None and hm.complete and window.inference.layer.isVisible()
    thread_gone = window.inference.runner.thread is None
    assert thread_gone and not window.inference.cancel_button.isEnabled()
    r, c = np.argwhere(hm.computed)[0]
    rect = hm.grid.cell_rect(int(r), int(c))
    window._on_view_cursor_moved(rect.x + rect.w / 2, rect.y + rect.h / 2)
    assert window.pos_label.text().startswith(f"P(IDC) {hm.prob[r, c]:.2f}")  # the map shown
    window.heatmap_action.trigger()  # H again: hide
    assert not window.inference.layer.isVisible()
    # Reopen: shown at once from the per-user cache, no job started.
    assert window.open_path(CMU_SVS)
    assert window.inference.heatmap is not None and window.inference.heatmap.complete
    assert not window.inference.runner.running()
    assert "cache" in window.inference.rate_label.text()


def test_cancel_mid_run_keeps_computed_cells(qtbot, window: MainWindow) -> None:
    assert window.open_path(DEMO)
    reports: list[BatchResult] = []
    window.inference.runner.report.connect(lambda r: reports.append(r) if isinstance(r, BatchResult) else None)
    window.inference.start()
    qtbot.waitUntil(lambda: len(reports) >= 1, timeout=30_000)
    window.inference.cancel()
    assert not window.inference.runner.running() and window.inference.runner.thread is None
    hm = window.inference.heatmap
    assert 0 < hm.patch_done.sum() < hm.tissue.sum()
    assert window.inference.run_button.isEnabled()  # can resume
    assert "Cancelled" in window.inference.rate_label.text()


def test_close_window_mid_run(qtbot, window: MainWindow) -> None:
    assert window.open_path(DEMO)
    window.inference.start()
    runner = window.inference.runner
    thread = runner.thread
    qtbot.waitUntil(lambda: window.inference.heatmap is not None, timeout=30_000)
    window.close()
    assert thread.isFinished() and runner.thread is None


def test_switching_slide_mid_run_stops_the_job(qtbot, window: MainWindow) -> None:
    assert window.open_path(DEMO)
    window.inference.start()
    qtbot.waitUntil(lambda: window.inference.heatmap is not None, timeout=30_000)
    demo_fp = window.slide.fingerprint()
    assert window.open_path(CMU_SVS)
    assert not window.inference.runner.running()
    hm = window.inference.heatmap  # none, or CMU's own from the cache: never the demo's
    assert hm is None or hm.info.slide_fingerprint == window.slide.fingerprint() != demo_fp


def test_slide_without_mpp_asks_before_running(qtbot, window: MainWindow, slide_no_mpp) -> None:
    assert window.open_path(slide_no_mpp[0])
    with qtbot.waitSignal(window.inference.mpp_needed, timeout=2000):
        window.inference.start()
    assert not window.inference.runner.running()  # nothing runs at a guessed scale


def test_ground_truth_outline_and_agreement(qtbot, window: MainWindow) -> None:
    assert window.open_path(DEMO)
    assert window.inference.truth_box.isEnabled()
    window.inference.truth_box.setChecked(True)
    assert window.inference.truth is not None and not window.inference.truth.path().isEmpty()
    with qtbot.waitSignal(window.inference.heatmap_finished, timeout=120_000):
        window.inference.start()
    text = window.inference.agreement_label.text()
    assert "AUC" in text
    auc = float(text.split("AUC ")[1].split(",")[0])
    assert auc > 0.8
    # the same figures without the cells on the IDC / non-IDC borders of the demo's truth
    labels, _ = cell_truth(window.inference.heatmap.grid, window.inference.ground_truth)
    inner = int((away_from_borders(labels) >= 0).sum())
    assert f"Away from region borders ({inner} cells): AUC " in text and inner < (labels >= 0).sum()
    # Disagreements: the cells the agreement counts as false and missed IDC, outlined on the slide.
    panel, hm = window.inference, window.inference.heatmap
    m = agreement(hm, labels).metrics
    assert f"; {m.fp:.0f} cells called IDC against the truth, {m.fn:.0f} IDC cells missed." in text
    assert panel.disagree_box.isEnabled() and not panel.disagreement_layers
    panel.disagree_box.setChecked(True)

    def outlines() -> list[shapely.Geometry]:
        """Each class's disagreement cells, merged, as the panel must outline them."""
        regions = disagreements(hm, labels)
        return [shapely.union_all([r.geometry for r in regions if r.cls == c.name]) for c in DISAGREEMENT_CLASSES]

    def shown() -> list[shapely.Geometry]:
        assert all(layer.scene() is window.view.scene() for layer in panel.disagreement_layers)
        return [layer.path() for layer in panel.disagreement_layers]

    context_outlines = outlines()
    assert shown() == [geometry_path(g) for g in context_outlines]  # the demo has both kinds
    panel.context_box.setChecked(False)  # the per-patch map disagrees elsewhere: the outlines follow it
    raw_outlines = outlines()
    assert not all(a.equals(b) for a, b in zip(context_outlines, raw_outlines, strict=True))
    assert shown() == [geometry_path(g) for g in raw_outlines]
    panel.disagree_box.setChecked(False)
    assert not panel.disagreement_layers


def test_context_map_is_shown_by_default_and_raw_on_toggle(qtbot, window: MainWindow, model) -> None:
    from dataclasses import replace

    ctx_model = replace(model, meta=replace(model.meta, context_sigma=1.0, context_threshold=0.6, threshold_adapt={}))
    window.session.set_model(ctx_model)
    assert window.open_path(CMU_SVS)
    with qtbot.waitSignal(window.inference.heatmap_finished, timeout=60_000):
        window.inference.start()
    panel = window.inference
    hm = panel.heatmap
    assert panel.context_box.isEnabled() and panel.context_box.isChecked() and hm.context
    assert hm.threshold == 0.6 and window.annotation_panel.region_threshold.value() == pytest.approx(0.6)
    raw, shown = hm.raw_prob, hm.prob
    assert np.array_equal(np.isnan(raw), np.isnan(shown)) and not np.allclose(raw, shown, equal_nan=True)
    cell = tuple(np.argwhere(np.isfinite(shown))[0])
    rect = hm.grid.cell_rect(*cell)
    window._on_view_cursor_moved(rect.x + rect.w / 2, rect.y + rect.h / 2)
    assert window.pos_label.text().startswith(f"P(IDC) {shown[cell]:.2f}")  # hover reads the map shown
    panel.context_box.setChecked(False)
    assert not hm.context and hm.threshold == ctx_model.meta.threshold
    assert window.annotation_panel.region_threshold.value() == pytest.approx(ctx_model.meta.threshold)
    window._on_view_cursor_moved(rect.x + rect.w / 2, rect.y + rect.h / 2)
    assert window.pos_label.text().startswith(f"P(IDC) {raw[cell]:.2f}")
    # A model without context has nothing to toggle.
    window.session.set_model(replace(model, meta=replace(model.meta, context_sigma=0.0, context_threshold=None)))
    assert not panel.context_box.isEnabled()


def test_slider_follows_an_adaptive_threshold_until_the_user_moves_it(qtbot, window: MainWindow, model) -> None:
    from dataclasses import replace

    # Reference far below any slide's 90th-percentile logit: this slide's threshold rises.
    adapt = {"percentile": 90.0, "slope": 0.5, "reference": -6.0, "low": -6.0, "high": 6.0}
    window.session.set_model(replace(model, meta=replace(model.meta, context_sigma=0.0, context_threshold=None,
                                                         threshold=0.3, threshold_adapt=adapt)))
    assert "adapted to each slide" in window.inference.model_label.text()
    assert window.open_path(CMU_SVS)
    with qtbot.waitSignal(window.inference.heatmap_finished, timeout=60_000):
        window.inference.start()
    panel = window.inference
    hm = panel.heatmap
    assert hm.threshold > 0.3
    assert panel.threshold.value() == round(hm.threshold * 100)
    assert window.annotation_panel.region_threshold.value() == pytest.approx(hm.threshold, abs=0.005)
    panel.threshold.setValue(10)  # the user's choice stands when the threshold is followed again
    panel._follow_threshold()
    assert panel.threshold.value() == 10
    panel.context_box.setChecked(False)  # another map: its own threshold on this slide
    assert panel.threshold.value() == round(hm.threshold * 100)


def test_switching_slides_50_times_mid_run_applies_no_stale_report(qtbot, window: MainWindow, slide_mpp) -> None:
    """Open, start, switch after a seeded random delay, 50 times: every report that reaches the
    panel belongs to the slide open at that moment, nothing crashes, no thread is left."""
    from inference.session import Planned

    rng = np.random.default_rng(11)
    slides = [DEMO, CMU_SVS, slide_mpp[0]]
    panel = window.inference
    delivered: list[tuple[str, object]] = []
    panel.runner.report.connect(lambda r: delivered.append((window.slide.fingerprint(), r)))
    for i in range(50):
        assert window.open_path(slides[i % len(slides)])
        panel.start()
        qtbot.wait(int(rng.integers(0, 400)))
    stale = [r for fp, r in delivered if isinstance(r, Planned) and r.heatmap.info.slide_fingerprint != fp]
    assert not stale and sum(isinstance(r, Planned) for _, r in delivered) >= 10
    # Whatever the last job delivered after its plan is exactly what its heatmap holds.
    qtbot.waitUntil(lambda: not panel.runner.running(), timeout=120_000)
    last_plan = max(i for i, (_, r) in enumerate(delivered) if isinstance(r, Planned))
    done = sum(len(r.rows) for _, r in delivered[last_plan:] if isinstance(r, BatchResult))
    hm = panel.heatmap
    planned = delivered[last_plan][1]
    assert hm is not None and hm.info.slide_fingerprint == window.slide.fingerprint()
    if hm is planned.heatmap:  # the last job ran on the slide open now
        assert int(hm.patch_done.sum()) == planned.resumed + done
    else:  # the slide open now came complete from the cache, so no job was started for it
        assert hm.complete and not panel.runner.running()
    window.close()
    assert panel.runner.threads() == 0


def test_cancel_then_run_resumes_where_it_stopped(qtbot, window: MainWindow, monkeypatch) -> None:
    """Issue 13, item 7: progress went 352 -> 32 after a cancel; now the finished cells stay."""
    import viewer.inference_panel as panel_module
    from inference.session import Planned

    # The first job waits after its third batch until the test has cancelled it, so that it
    # cannot finish the slide's 35 cells first on a busy machine (the worker thread runs ahead
    # of the GUI thread's reports); the second job starts after the cancel and never waits.
    real_infer, cancelled = panel_module.infer, threading.Event()

    def infer(*args, **kwargs):
        gen, seen = real_infer(*args, **kwargs), 0
        try:
            for report in gen:
                yield report
                seen += isinstance(report, BatchResult)
                if seen == 3:
                    cancelled.wait(30)
        finally:
            gen.close()

    monkeypatch.setattr(panel_module, "infer", infer)
    panel = window.inference
    panel.settings = PredictSettings(batch_size=4, first_batch=4)
    assert window.open_path(CMU_SVS)
    batches: list[BatchResult] = []
    panel.runner.report.connect(lambda r: batches.append(r) if isinstance(r, BatchResult) else None)
    panel.start()
    qtbot.waitUntil(lambda: len(batches) >= 3, timeout=60_000)
    panel.cancel()
    cancelled.set()
    qtbot.waitUntil(lambda: panel.runner.threads() == 0, timeout=10_000)  # it winds down within a batch
    kept = int(panel.heatmap.patch_done.sum())
    assert 12 <= kept < int(panel.heatmap.tissue.sum())
    plans: list[Planned] = []
    panel.runner.report.connect(lambda r: plans.append(r) if isinstance(r, Planned) else None)
    with qtbot.waitSignal(panel.heatmap_finished, timeout=60_000):
        panel.start()
    assert plans[0].resumed == kept and plans[0].heatmap is panel.heatmap
    assert panel.heatmap.complete and panel.progress.value() == plans[0].total


def test_an_ensemble_names_each_networks_view_and_paints_the_slide(qtbot, window: MainWindow, tmp_path: Path) -> None:
    import torch

    from inference.model import Architecture, ModelMeta, build, ensemble, save_checkpoint

    arch, members = Architecture(depth=10, widen=1), []
    for i, (margin, mpp) in enumerate(((0, 4.0), (25, 4.0), (25, 4.0), (12, 8.0))):
        torch.manual_seed(i)
        save_checkpoint(tmp_path / f"{i}.pt", build(arch),
                        ModelMeta(arch=arch, margin=margin, mpp=mpp, patch_size=int(200 / mpp)))
        members.append(load_checkpoint(tmp_path / f"{i}.pt"))
    net, meta = ensemble(members, [4.0, 1.0, 1.0, 2.0])
    save_checkpoint(tmp_path / "e.pt", net, meta)
    window.session.set_model(load_checkpoint(tmp_path / "e.pt"))
    panel = window.inference
    # The two networks with the same view are named once, each with its share of the logit; the
    # coarser one with its resolution.
    assert ("50x50 px patches at 4 \u00b5m/px (200 \u00b5m; WRN-10-1 sees the patch alone (weight 0.5), "
            "2 WRN-10-1 see the patch with 100 \u00b5m around it (weight 0.12 each) and WRN-10-1 sees the "
            "patch at 8 \u00b5m/px with 96 \u00b5m around it (weight 0.25))") in panel.model_label.text()
    assert window.open_path(CMU_SVS)
    with qtbot.waitSignal(panel.heatmap_finished, timeout=120_000):
        panel.start()
    assert panel.heatmap.complete and panel.heatmap.info.model_id.startswith("WRN-10-1+WRN-10-1+WRN-10-1+WRN-10-1-")
