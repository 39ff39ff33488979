"""A seeded monkey: 1,000 random UI actions on the demo slide and a synthetic slide.

Pass means: no exception, no Qt warning (pytest-qt fails the test on any), no thread left, and
the annotations on disk equal those in memory at the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PySide6.QtCore import Qt

from inference.annotation_io import read_file
from inference.model import load_checkpoint
from inference.predict import PredictSettings
from resources import shipped_model_path
from tests.conftest import DEMO
from tests.viewer.conftest import show_window
from tests.viewer.test_annotation_tools import drag

ACTIONS = ("open", "zoom", "pan", "heatmap", "cancel", "draw", "undo", "redo", "class", "export",
           "switch_tab", "select_all_delete", "context", "fit")


def test_monkey_1000_random_actions(qtbot, tmp_path: Path, slide_mpp, monkeypatch) -> None:
    monkeypatch.setenv("IDC_VIEWER_CACHE", str(tmp_path / "cache"))
    slides = [tmp_path / DEMO.name, tmp_path / "synthetic.tif"]
    shutil.copy(DEMO, slides[0])
    shutil.copy(slide_mpp[0], slides[1])
    w = show_window(qtbot, tmp_path, 1100, 750, model=load_checkpoint(shipped_model_path()), device="cpu")
    w.inference.settings = PredictSettings(batch_size=32, first_batch=8)
    errors: list[str] = []
    w.error_shown.connect(errors.append)
    rng = np.random.default_rng(2026)
    assert w.open_path(slides[0])
    counts = dict.fromkeys(ACTIONS, 0)
    for i in range(1000):
        action = ACTIONS[int(rng.integers(len(ACTIONS)))]
        counts[action] += 1
        slide = w.slide
        wd, ht = slide.dimensions
        if action == "open":
            assert w.open_path(slides[int(rng.integers(2))])
        elif action == "zoom":
            w.view.zoom_by(float(rng.choice([0.5, 0.8, 1.25, 2.0])))
        elif action == "pan":
            w.view.center_on_l0(float(rng.uniform(0, wd)), float(rng.uniform(0, ht)))
        elif action == "heatmap":
            w.heatmap_action.trigger()
        elif action == "cancel":
            w.inference.cancel()
        elif action == "draw":
            w.tabs.setCurrentWidget(w.view)
            w.view.fit()
            w.tool_actions["rectangle"].trigger()
            x, y = float(rng.uniform(0.1, 0.7) * wd), float(rng.uniform(0.1, 0.7) * ht)
            drag(qtbot, w, [(x, y), (x + 0.1 * wd, y + 0.05 * ht), (x + 0.2 * wd, y + 0.15 * ht)])
            w.tool_actions["pan"].trigger()
        elif action == "undo":
            w.annotations.undo()
        elif action == "redo":
            w.annotations.redo()
        elif action == "class":
            combo = w.annotation_panel.class_combo
            combo.setCurrentIndex(int(rng.integers(combo.count())))
        elif action == "export":
            w.annotations.export_geojson(tmp_path / f"export{i % 3}.geojson")
        elif action == "switch_tab":
            w.tabs.setCurrentIndex(int(rng.integers(w.tabs.count())))
        elif action == "select_all_delete":
            w.tool_actions["select"].trigger()
            for item in w.annotations.layer.items.values() if w.annotations.layer else []:
                item.setSelected(bool(rng.random() < 0.3))
            w.annotations.delete_selected()
            w.tool_actions["pan"].trigger()
        elif action == "context":
            w.inference.context_box.setChecked(not w.inference.context_box.isChecked())
        elif action == "fit":
            qtbot.keyClick(w.view, Qt.Key.Key_0)
        qtbot.wait(int(rng.integers(0, 12)))
    assert min(counts.values()) > 30, counts
    assert not errors, errors
    store, path = w.annotations.store, None
    w.annotations.save_now()
    path = w.annotations.save_path
    in_memory = sorted((a.id, a.cls, a.geometry.wkb) for a in store.items)
    on_disk = sorted((a.id, a.cls, a.geometry.wkb) for a in read_file(path).annotations) if store.items else []
    assert in_memory and on_disk == in_memory  # (3 annotations remain with this seed)
    runner = w.inference.runner
    w.close()
    assert runner.threads() == 0 and w.training.runner.threads() == 0
