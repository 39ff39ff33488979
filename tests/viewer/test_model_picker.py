"""The viewer as a tool of several models: the picker switches the heatmap and restores it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.model import load_checkpoint
from inference.predict import PredictSettings
from resources import shipped_model_path
from tests.conftest import CMU_SVS
from tests.viewer.conftest import show_window
from viewer.main_window import MainWindow


@pytest.fixture
def window(qtbot, tmp_path: Path, monkeypatch) -> MainWindow:
    monkeypatch.setenv("IDC_VIEWER_CACHE", str(tmp_path / "cache"))
    w = show_window(qtbot, tmp_path, 1100, 750, model=load_checkpoint(shipped_model_path("idc")), device="cpu")
    w.inference.settings = PredictSettings(batch_size=64, first_batch=16)
    return w


def test_picker_switches_models_and_switching_back_is_instant(qtbot, window: MainWindow) -> None:
    panel = window.inference
    labels = [panel.picker.itemText(i) for i in range(panel.picker.count())]
    assert any("Invasive ductal carcinoma" in t for t in labels) and any("metastasis" in t for t in labels)
    assert window.open_path(CMU_SVS)
    with qtbot.waitSignal(panel.heatmap_finished, timeout=60_000):
        panel.start()
    idc_map = panel.heatmap
    assert panel.run_button.text() == "Run IDC heatmap" and idc_map.info.positive == "IDC"

    # The metastasis model: its own heatmap, computed at once because one was shown.
    with qtbot.waitSignal(panel.heatmap_finished, timeout=120_000):
        assert panel.picker.choose(str(shipped_model_path("metastasis")))
    meta_map = panel.heatmap
    assert window.session.model.meta.task == "metastasis" and meta_map is not idc_map
    assert meta_map.grid.patch_shape != idc_map.grid.patch_shape  # its own cells, at 0.972 um/px
    assert panel.legend.positive == "Metastasis" and panel.run_button.text() == "Run Metastasis heatmap"
    assert "lymph-node metastasis" in panel.picker.currentText().lower()
    r, c = np.argwhere(meta_map.computed)[0]
    rect = meta_map.grid.cell_rect(int(r), int(c))
    window._on_view_cursor_moved(rect.x + rect.w / 2, rect.y + rect.h / 2)
    assert window.pos_label.text().startswith(f"P(Metastasis) {meta_map.prob[r, c]:.2f}")

    # Back to IDC through the Model menu: the same heatmap object, no job.
    window.inference.picker.fill_menu(window.model_menu)
    actions = window.model_menu.actions()
    assert [a.isChecked() for a in actions[:2]] == [False, True]
    actions[0].trigger()
    assert panel.heatmap is idc_map and not panel.runner.running()
    assert window.worklist.picker.currentIndex() == 0  # every picker follows the session's model


def test_a_file_that_is_not_a_model_gets_one_sentence(qtbot, window: MainWindow, tmp_path: Path) -> None:
    bad = tmp_path / "not_a_model.pt"
    bad.write_bytes(b"not a checkpoint")
    with qtbot.waitSignal(window.inference.picker.error) as sig:
        assert not window.inference.picker.choose(str(bad))
    assert sig.args[0].endswith(".") and window.session.model.meta.task == "idc"
    assert window.inference.picker.currentIndex() == 0


def test_a_wsinfer_folder_asks_first_because_torchscript_is_code(qtbot, window: MainWindow, tmp_path: Path) -> None:
    from viewer.cli import main

    folder = tmp_path / "ws"
    assert main(["export-model", "--model", "metastasis", str(folder)]) == 0
    picker = window.inference.picker
    asked = []
    picker.confirm = lambda title, text: asked.append(text) or False
    assert not picker.choose(str(folder))
    assert "code that runs on this computer" in asked[0] and window.session.model.meta.task == "idc"
    picker.confirm = lambda title, text: True
    assert picker.choose(str(folder))
    model = window.session.model
    assert model.meta.task == "external" and model.meta.positive_class == "Metastasis"
    assert window.inference.run_button.text() == "Run Metastasis heatmap"
    assert "A model from a WSInfer folder" in picker.currentText()
