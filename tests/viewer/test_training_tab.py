"""The training tab end to end on a tiny real patch folder, against the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import shapely
import torch
from PySide6.QtCore import QThread

from inference.annotations import Annotation
from inference.model import load_checkpoint
from inference.predict import PredictSettings
from resources import shipped_model_path
from tests.conftest import CMU_SVS, DEMO, need_patches
from tests.viewer.conftest import show_window
from training.loop import EpochReport, StepReport
from viewer.cli import main
from viewer.main_window import MainWindow


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 real patients, at most 14 patches each, in the Kaggle layout."""
    root = need_patches()
    out = tmp_path_factory.mktemp("tiny") / "patches"
    patients = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "8975")[:16]
    for pt in patients:
        for label in ("0", "1"):
            files = sorted((root / pt / label).glob("*.png"))[:7]
            if files:
                (out / pt / label).mkdir(parents=True)
                for f in files:
                    shutil.copy(f, out / pt / label / f.name)
    return out


@pytest.fixture
def window(qtbot, tmp_path: Path, monkeypatch) -> MainWindow:
    monkeypatch.setenv("IDC_VIEWER_CACHE", str(tmp_path / "cache"))  # no heatmaps from other tests
    w = show_window(qtbot, tmp_path, 1300, 900, model=load_checkpoint(shipped_model_path()), device="cpu")
    w.inference.settings = PredictSettings(batch_size=128)
    return w


def configure(tab, folder: Path, epochs: int = 2) -> None:
    tab.add_folder(str(folder))
    tab.use_regions.setChecked(False)
    tab.epochs.setValue(epochs)
    tab.samples.setValue(128)
    tab.batch.setValue(64)
    tab.lr.setValue(1e-3)
    tab.freeze.setChecked(True)
    tab.val_fraction.setValue(0.25)
    tab.seed.setValue(7)


def start_and_wait_for(qtbot, tab, kind: type) -> QThread:
    """Start training, wait for its first report of ``kind`` and return the worker thread."""
    seen: list[object] = []
    tab.runner.report.connect(lambda r: seen.append(r) if isinstance(r, kind) else None)
    tab.start()
    qtbot.waitUntil(lambda: bool(seen), timeout=120_000)
    return tab.runner.thread


def test_train_use_model_and_heatmap_reruns(qtbot, window: MainWindow, tiny_folder: Path, tmp_path: Path,
                                            monkeypatch) -> None:
    import inference.model as model_module

    reads: list[Path] = []
    real_load = model_module.load_checkpoint

    def counting_load(path, *args, **kwargs):  # noqa: ANN001, ANN202
        reads.append(Path(path))
        return real_load(path, *args, **kwargs)

    for module in ("training.loop", "training.session", "viewer.training_tab"):
        monkeypatch.setattr(f"{module}.load_checkpoint", counting_load)
    slide = tmp_path / CMU_SVS.name
    shutil.copy(CMU_SVS, slide)
    assert window.open_path(slide)
    tab = window.training
    configure(tab, tiny_folder)
    epochs: list[EpochReport] = []
    steps: list[StepReport] = []
    tab.runner.report.connect(lambda r: epochs.append(r) if isinstance(r, EpochReport) else
                              steps.append(r) if isinstance(r, StepReport) else None)
    with qtbot.waitSignal(tab.runner.finished, timeout=120_000):
        tab.start()
    assert len(epochs) == 2 and len(steps) == 4
    # Models pass as loaded objects: the model in use is never read again, the new one once.
    assert reads == [tab.result_path], reads
    assert len(tab.curves.train_curve.getData()[0]) == 2 and len(tab.curves.step_curve.getData()[0]) == 4
    assert tab.curves.epoch_table.rowCount() == 2
    assert tab.compare is not None and tab.compare.current is not None
    assert tab.compare_table.item(0, 0).text() and tab.compare_table.item(0, 1).text()
    assert tab.counts_table.rowCount() >= 3  # the source and the train/val splits
    meta = load_checkpoint(tab.result_path).meta
    assert meta.provenance["sources"] == [f"patch folder {tiny_folder}"] and meta.provenance["init"]
    tab.confirm = lambda title, text: True  # the user accepts, even if the new model were worse
    with qtbot.waitSignal(window.inference.heatmap_finished, timeout=120_000):
        tab.use_button.click()
    assert window.inference.model.path == tab.result_path
    assert window.inference.heatmap.info.model_id == window.inference.model.model_id
    saved = tab.save_checkpoint(tmp_path / "mine.pt")
    assert load_checkpoint(saved).sha256 == load_checkpoint(tab.result_path).sha256


def test_gui_and_cli_give_the_same_model(qtbot, window: MainWindow, tiny_folder: Path, tmp_path: Path) -> None:
    tab = window.training
    configure(tab, tiny_folder, epochs=1)
    tab.augment.setChecked(True)
    with qtbot.waitSignal(tab.runner.finished, timeout=120_000):
        tab.start()
    gui = load_checkpoint(tab.result_path)
    out = tmp_path / "cli.pt"
    rc = main(["train", str(tiny_folder), "--out", str(out), "--init", "idc", "--freeze-trunk",
               "--epochs", "1", "--samples-per-epoch", "128", "--batch-size", "64", "--lr", "0.001",
               "--val-fraction", "0.25", "--test-fraction", "0", "--seed", "7", "--device", "cpu"])
    assert rc == 0
    cli = load_checkpoint(out)
    for k, v in gui.net.state_dict().items():
        assert torch.allclose(v.float(), cli.net.state_dict()[k].float(), atol=1e-6), k
    assert gui.meta.threshold == cli.meta.threshold


def test_cancel_mid_epoch_keeps_best_so_far(qtbot, window: MainWindow, tiny_folder: Path) -> None:
    tab = window.training
    configure(tab, tiny_folder, epochs=30)
    tab.samples.setValue(256)
    thread = start_and_wait_for(qtbot, tab, EpochReport)
    tab.cancel()  # returns at once; the job winds down within one batch on its own thread
    assert not tab.runner.running()
    qtbot.waitUntil(thread.isFinished, timeout=30_000)
    assert tab.result_model is not None and tab.use_button.isEnabled()
    assert "Cancelled" in tab.status.text()


def test_regions_of_the_open_slide_as_source(qtbot, window: MainWindow, tmp_path: Path) -> None:
    slide = tmp_path / DEMO.name
    shutil.copy(DEMO, slide)
    assert window.open_path(slide)
    store = window.annotations.store
    store.add(Annotation(shapely.box(1500, 900, 2100, 1500), "IDC", "a"),
              Annotation(shapely.box(2900, 1700, 3300, 2300), "Non-IDC", "b"),
              Annotation(shapely.box(700, 1900, 1100, 2300), "Non-IDC", "c"),
              Annotation(shapely.box(1200, 1600, 1500, 1900), "IDC", "d"))
    tab = window.training
    tab.use_regions.setChecked(True)
    assert tab.split_by.currentText() == "automatic"  # one slide alone: split by region, no error
    sources = tab.sources()
    assert len(sources) == 1 and len(sources[0].annotations) == 4
    with qtbot.waitSignal(tab.runner.finished, timeout=60_000):
        tab.count()  # a background job: the GUI thread stays free
        assert tab.runner.running() and not tab.count_button.isEnabled()
    row = [tab.counts_table.item(0, c).text() for c in range(4)]
    assert row[0] == f"regions of {DEMO.name}"
    splits = [tab.counts_table.item(r, 0).text() for r in range(tab.counts_table.rowCount())]
    assert "split: train" in splits and "split: val" in splits  # what Start will do, said before Start
    assert int(row[1]) == 12 * 12 + 6 * 6 and int(row[2]) == 8 * 12 + 8 * 8  # 50 px cells inside the boxes
    assert int(row[3]) == 4


def test_close_window_mid_training(qtbot, window: MainWindow, tiny_folder: Path) -> None:
    tab = window.training
    configure(tab, tiny_folder, epochs=30)
    thread = start_and_wait_for(qtbot, tab, StepReport)
    workdir = tab._workdir
    assert workdir.is_dir()
    window.close()
    assert thread.isFinished()
    assert not workdir.exists()  # no /tmp/idc-train-* folder left behind


def test_model_regions_are_not_truth_until_a_person_confirms_or_edits_them(qtbot, window: MainWindow,
                                                                           tmp_path: Path) -> None:
    slide = tmp_path / DEMO.name
    shutil.copy(DEMO, slide)
    assert window.open_path(slide)
    store = window.annotations.store
    drawn = Annotation(shapely.box(1500, 900, 2100, 1500), "IDC", "drawn")
    model_a = Annotation(shapely.box(2900, 1700, 3300, 2300), "IDC", "IDC region 1", source="model")
    model_b = Annotation(shapely.box(700, 1900, 1100, 2300), "IDC", "IDC region 2", source="model")
    store.add(drawn, model_a, model_b)
    tab = window.training
    assert [a.name for a in window.training.region_source().annotations] == ["drawn"]  # the model's own output is not truth
    window.tabs.setCurrentWidget(tab)
    assert tab.regions_label.text().startswith("1 region drawn or confirmed") and "2 model regions" in tab.regions_label.text()
    store.update(model_a.id, cls="Non-IDC")  # a person corrected it: now truth
    window.annotation_panel.table.selectRow([a.id for a in store.items].index(model_b.id))
    window.annotation_panel.confirm_button.click()  # accepted as it is
    names = sorted(a.name for a in window.training.region_source().annotations)
    assert names == ["IDC region 1", "IDC region 2", "drawn"]
    store.undo()  # the confirmation is one undo step
    assert sorted(a.name for a in window.training.region_source().annotations) == ["IDC region 1", "drawn"]


def test_a_worse_model_needs_confirmation_and_a_cancelled_run_offers_only_its_own(qtbot, window: MainWindow,
                                                                                  tiny_folder: Path) -> None:
    tab = window.training
    configure(tab, tiny_folder, epochs=1)
    tab.freeze.setChecked(False)
    tab.lr.setValue(0.5)  # a learning rate that wrecks the shipped model: certainly worse
    with qtbot.waitSignal(tab.runner.finished, timeout=120_000):
        tab.start()
    assert tab.new_is_worse() is not None and "worse" in tab.status.text()
    current = window.inference.model
    asked: list[str] = []
    tab.confirm = lambda title, text: asked.append(text) is not None and False  # the user says no
    tab.use_button.click()
    assert asked and window.inference.model is current and "Kept" in tab.status.text()
    # A new run cancelled before its first epoch must not offer the previous run's checkpoint.
    tab.lr.setValue(1e-3)
    tab.epochs.setValue(30)
    tab.samples.setValue(4096)
    start_and_wait_for(qtbot, tab, StepReport)
    tab.cancel()
    assert tab.result_model is None and not tab.use_button.isEnabled()
    assert "nothing to keep" in tab.status.text()


def test_switching_slides_50_times_while_fine_tuning(qtbot, window: MainWindow, tiny_folder: Path, slide_mpp) -> None:
    """Fine-tune while the slide changes 50 times after seeded random delays (with a heatmap
    started on each): only the current jobs' reports arrive, the run ends normally, no thread is left."""
    import numpy as np


    tab = window.training
    configure(tab, tiny_folder, epochs=3)
    epochs: list[EpochReport] = []
    tab.runner.report.connect(lambda r: epochs.append(r) if isinstance(r, EpochReport) else None)
    tab.start()
    job = tab.runner.job_id
    rng = np.random.default_rng(5)
    slides = [DEMO, CMU_SVS, slide_mpp[0]]
    for i in range(50):
        assert window.open_path(slides[i % 3])
        window.inference.start()
        qtbot.wait(int(rng.integers(0, 60)))
    qtbot.waitUntil(lambda: not tab.runner.running(), timeout=180_000)
    assert tab.runner.job_id == job  # switching slides never restarted or stopped the fine-tune
    assert [e.epoch for e in epochs] == [1, 2, 3] and tab.compare is not None
    window.close()
    assert tab.runner.threads() == 0 and window.inference.runner.threads() == 0
