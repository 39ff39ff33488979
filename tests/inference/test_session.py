"""The inference session: one generator for the CLI and the panel; stopped sessions resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.heatmap import cache_path
from inference.model import LoadedModel, load_checkpoint
from inference.predict import BatchResult, PredictSettings
from inference.session import Finished, Planned, cached_heatmap, infer
from inference.slide import open_slide
from resources import shipped_model_path
from tests.conftest import CMU_SVS

SMALL_BATCHES = PredictSettings(batch_size=4, first_batch=4)  # the CMU slide has a few dozen tissue patches


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_checkpoint(shipped_model_path())


def test_session_reports_plan_batches_then_finished_and_caches(model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IDC_VIEWER_CACHE", str(tmp_path))
    with open_slide(CMU_SVS) as slide:
        reports = list(infer(slide, model, "cpu", SMALL_BATCHES))
        assert isinstance(reports[0], Planned) and isinstance(reports[-1], Finished)
        assert all(isinstance(r, BatchResult) for r in reports[1:-1])
        hm = reports[0].heatmap
        assert reports[-1].heatmap is hm and hm.complete  # every batch landed in the one heatmap
        assert sum(len(r.rows) for r in reports[1:-1]) == reports[0].total
        assert reports[-1].cache == cache_path(hm.info) and reports[-1].cache.exists()
        again = list(infer(slide, model, "cpu", SMALL_BATCHES))  # from the cache: nothing to compute
        assert [type(r) for r in again] == [Planned, Finished] and again[0].resumed == again[0].total
        np.testing.assert_array_equal(again[0].heatmap.patch_prob, hm.patch_prob)


def test_stopped_session_keeps_its_cells_and_the_next_one_resumes(model, tmp_path: Path, monkeypatch) -> None:
    """Cancel then resume (issue 13, item 7): finished cells are kept and not computed again, and
    the resumed heatmap equals an uninterrupted one."""
    monkeypatch.setenv("IDC_VIEWER_CACHE", str(tmp_path / "a"))
    with open_slide(CMU_SVS) as slide:
        gen = infer(slide, model, "cpu", SMALL_BATCHES)
        planned = next(gen)
        done_before = 0
        for _ in range(3):
            done_before = next(gen).done
        gen.close()  # what the panel's Cancel does
        partial = cached_heatmap(slide, model, SMALL_BATCHES)
        assert partial is not None and not partial.complete
        assert int((partial.patch_done & partial.tissue).sum()) == done_before
        resumed = list(infer(slide, model, "cpu", SMALL_BATCHES))
        assert resumed[0].resumed == done_before
        assert sum(len(r.rows) for r in resumed if isinstance(r, BatchResult)) == planned.total - done_before
        assert resumed[-1].heatmap.complete
        monkeypatch.setenv("IDC_VIEWER_CACHE", str(tmp_path / "b"))
        whole = list(infer(slide, model, "cpu", SMALL_BATCHES))[-1].heatmap
        np.testing.assert_allclose(resumed[-1].heatmap.raw_prob, whole.raw_prob, atol=1e-6, equal_nan=True)


def test_resume_continues_the_heatmap_on_screen(model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IDC_VIEWER_CACHE", str(tmp_path))
    with open_slide(CMU_SVS) as slide:
        gen = infer(slide, model, "cpu", SMALL_BATCHES, read_cache=False)
        shown = next(gen).heatmap
        next(gen)
        gen.close()
        first = next(infer(slide, model, "cpu", SMALL_BATCHES, read_cache=False, resume=shown))
        assert first.heatmap is shown and first.resumed == int(shown.patch_done.sum()) > 0
        # A heatmap of another grid is not resumed: a new one is planned.
        other = next(infer(slide.with_mpp(0.25), model, "cpu", SMALL_BATCHES, read_cache=False, resume=shown))
        assert other.heatmap is not shown and other.resumed == 0
