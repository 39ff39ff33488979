"""Tissue context, ground truth and slide-level evaluation on synthetic slides with known truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from inference.annotation_io import dumps_asap, dumps_geojson, parse_geojson
from inference.annotations import Annotation
from inference.context import context_prob
from inference.heatmap import Heatmap, HeatmapInfo, cache_path
from inference.patches import PatchGrid
from inference.slide_eval import evaluate_heatmap, summary
from inference.truth import (
    DISAGREEMENT_CLASSES,
    FALSE_IDC,
    MISSED_IDC,
    TruthError,
    agreement,
    away_from_borders,
    cell_truth,
    disagreements,
    labels_path,
    load_truth,
)
from tests.conftest import DEMO
from viewer.cli import main


def make_heatmap(prob: np.ndarray, sigma: float = 0.0, threshold: float = 0.5, adapt=None,
                 slide_call=None) -> Heatmap:
    """A heatmap with the given per-cell probabilities (NaN: not computed yet) on a 50 px grid at
    4 um/px; the tissue is the whole grid when cells are missing, else the computed cells."""
    rows, cols = prob.shape
    grid = PatchGrid.build((cols * 50, rows * 50), 4.0, 4.0, 50)
    tissue = np.isfinite(prob) if adapt is None else np.ones(prob.shape, bool)
    hm = Heatmap(HeatmapInfo("slide", "model", grid, 0.1, threshold, sigma, threshold if sigma else None, adapt,
                             slide_call), tissue)
    rr, cc = np.nonzero(np.isfinite(prob))
    hm.add(rr, cc, prob[rr, cc].astype(np.float32))
    return hm


def test_context_never_moves_a_cell() -> None:
    prob = np.full((9, 11), 0.1, np.float32)
    prob[4, 6] = 0.99
    prob[0, :3] = np.nan
    ctx = context_prob(prob, 1.0)
    assert np.array_equal(np.isnan(ctx), np.isnan(prob))
    assert np.unravel_index(np.nanargmax(ctx), ctx.shape) == (4, 6)
    assert 0.1 < ctx[4, 6] < 0.99 and ctx[4, 7] > ctx[4, 9] > 0.1 - 1e-6
    assert np.array_equal(context_prob(prob, 0.0), prob, equal_nan=True)


def test_context_ignores_cells_outside_tissue() -> None:
    prob = np.full((5, 5), np.nan, np.float32)
    prob[:, :2] = 0.8  # tissue strip beside background
    ctx = context_prob(prob, 1.5)
    assert np.allclose(ctx[:, :2], 0.8, atol=1e-5)  # background is left out, not averaged in as 0


def test_heatmap_shows_context_by_default_and_raw_on_toggle(cache_dir: Path) -> None:
    prob = np.full((6, 6), 0.2, np.float32)
    prob[2, 2] = 0.9
    hm = make_heatmap(prob, sigma=1.0, threshold=0.4)
    assert hm.context and hm.prob[2, 2] < 0.9 and hm.threshold == 0.4
    hm.context = False
    assert hm.prob[2, 2] == pytest.approx(0.9)
    raw_key = make_heatmap(prob).info.key()
    assert raw_key != hm.info.key()  # the cache key includes the context
    path = hm.save(cache_dir / "ctx.npz")
    back = Heatmap.load(path)
    assert back.info == hm.info and np.allclose(back.prob, context_prob(hm.raw_prob, 1.0), equal_nan=True)
    assert cache_path(back.info) != cache_path(make_heatmap(prob).info)


def test_evaluate_heatmap_gives_exact_cell_counts() -> None:
    # 4 x 6 cells; truth: IDC on columns 0-2 of rows 0-1, non-IDC on rows 2-3; cell (0, 5) unlabelled.
    prob = np.array([[0.9, 0.8, 0.3, 0.1, 0.2, 0.9],
                     [0.7, 0.6, 0.9, 0.1, 0.1, 0.9],
                     [0.6, 0.1, 0.2, 0.3, 0.1, 0.1],
                     [0.1, 0.1, np.nan, 0.9, 0.2, 0.1]], np.float32)
    truth_geojson = dumps_geojson([
        Annotation(shapely.box(0, 0, 150, 100), "IDC"),
        Annotation(shapely.box(0, 100, 300, 200), "Non-IDC"),
    ])
    path = Path(__file__).parent / "_truth.geojson"
    path.write_bytes(truth_geojson)
    try:
        truth = load_truth(path)
    finally:
        path.unlink()
    hm = make_heatmap(prob)
    labels, ambiguous = cell_truth(hm.grid, truth)
    assert ambiguous == 0 and (labels == 1).sum() == 6 and (labels == 0).sum() == 12
    res = evaluate_heatmap("s", hm, truth)
    a = res.raw
    assert a.cells == 18 and a.idc_cells == 6 and a.outside_tissue == 1  # (3, 2) is not tissue: P = 0
    m = a.metrics
    # IDC cells >= 0.5: 0.9 0.8 0.7 0.6 0.9 -> TP 5, FN 1 (0.3); non-IDC >= 0.5: 0.6, 0.9 -> FP 2, TN 10.
    assert (m.tp, m.fn, m.fp, m.tn) == (5, 1, 2, 10)
    assert m.sensitivity == pytest.approx(5 / 6) and m.specificity == pytest.approx(10 / 12)
    assert res.context is None and summary([res], "raw")["cells"] == 18
    # Away from the IDC / non-IDC border: row 0's IDC cells, and the non-IDC cells of row 2 from
    # column 4 (column 3 touches IDC (1, 2) diagonally) and all of row 3.
    inner = res.away_from_borders
    assert (inner.cells, inner.idc_cells, inner.outside_tissue) == (11, 3, 1)
    # IDC 0.9 0.8 0.3 -> TP 2, FN 1; non-IDC: only (3, 3) at 0.9 -> FP 1, TN 7.
    assert (inner.metrics.tp, inner.metrics.fn, inner.metrics.fp, inner.metrics.tn) == (2, 1, 1, 7)
    assert summary([res], "away_from_borders")["cells"] == 11


def _cells(regions: list[Annotation], cls: str) -> set[tuple[int, int]]:
    """The 50 px cells (row, col) that the regions of class ``cls`` cover, read back from their geometry."""
    union = shapely.union_all([r.geometry for r in regions if r.cls == cls])
    return {(r, c) for r in range(8) for c in range(8) if union.contains(shapely.Point(c * 50 + 25, r * 50 + 25))}


def test_disagreements_are_the_false_and_missed_cells_of_the_agreement() -> None:
    # The 4 x 6 slide above at threshold 0.5, IDC on rows 0-1, columns 0-2, non-IDC on rows 2-3:
    # FP (2, 0) at 0.6 and (3, 3) at 0.9, FN (0, 2) at 0.3; (3, 2) is outside the tissue and non-IDC: TN.
    prob = np.array([[0.9, 0.8, 0.3, 0.1, 0.2, 0.9],
                     [0.7, 0.6, 0.9, 0.1, 0.1, 0.9],
                     [0.6, 0.1, 0.2, 0.3, 0.1, 0.1],
                     [0.1, 0.1, np.nan, 0.9, 0.2, 0.1]], np.float32)
    labels = np.full(prob.shape, -1, np.int8)
    labels[:2, :3] = 1
    labels[2:, :] = 0
    hm = make_heatmap(prob)
    regions = disagreements(hm, labels)
    assert {r.cls for r in regions} == {FALSE_IDC, MISSED_IDC} and all(r.source == "model" for r in regions)
    assert _cells(regions, FALSE_IDC) == {(2, 0), (3, 3)} and _cells(regions, MISSED_IDC) == {(0, 2)}
    assert [r.name for r in regions] == ["False IDC 1", "False IDC 2", "Missed IDC 1"]
    m = agreement(hm, labels).metrics
    assert (m.fp, m.fn) == (2, 1)
    assert [r.id for r in disagreements(hm, labels)] == [r.id for r in regions]  # the same file every time
    # Neighbouring cells merge into one region; IDC outside the tissue mask is missed (shown as no IDC).
    prob = np.array([[np.nan, 0.2, 0.1, 0.9]], np.float32)
    labels = np.array([[1, 1, 1, 1]], np.int8)
    regions = disagreements(make_heatmap(prob), labels)
    assert len(regions) == 1 and regions[0].geometry.equals(shapely.box(0, 0, 150, 50))
    assert disagreements(make_heatmap(prob), np.full((1, 4), -1, np.int8)) == []


def test_away_from_borders_leaves_out_cells_touching_the_other_class() -> None:
    labels = np.array([[1, 1, 1, -1, 0],
                       [1, 1, 1, -1, 0],
                       [1, 1, 1, -1, 0],
                       [-1, -1, 0, 0, 0]], np.int8)
    # Unlabelled cells make no border; (2, 1), (2, 2), (3, 2) and (3, 3) touch the other class.
    assert away_from_borders(labels).tolist() == [[1, 1, 1, -1, 0],
                                                  [1, 1, 1, -1, 0],
                                                  [1, -1, -1, -1, 0],
                                                  [-1, -1, -1, -1, 0]]
    assert away_from_borders(labels).dtype == np.int8
    assert np.array_equal(away_from_borders(np.zeros((3, 3), np.int8)), np.zeros((3, 3), np.int8))


def test_overlapping_truth_is_ambiguous_and_asap_reads_the_same(tmp_path: Path) -> None:
    anns = [Annotation(shapely.box(0, 0, 100, 100), "IDC"), Annotation(shapely.box(50, 0, 200, 100), "Non-IDC")]
    (tmp_path / "t.xml").write_bytes(dumps_asap(anns))
    truth = load_truth(tmp_path / "t.xml")
    grid = PatchGrid.build((200, 100), 4.0, 4.0, 50)
    labels, ambiguous = cell_truth(grid, truth)
    # Cells of 50 px, two rows: column 0 IDC only; column 1 in both, not compared; 2 and 3 non-IDC.
    assert ambiguous == 2 and labels.tolist() == [[1, -1, 0, 0]] * 2


def test_cells_of_many_regions_are_those_whose_centre_each_contains() -> None:
    """cell_truth's one vectorised call gives each region exactly the cells whose centre it
    contains (checked against every centre of the grid), centres on an edge left out."""
    rng = np.random.default_rng(3)
    grid = PatchGrid.build((3651, 2701), 4.0, 4.0, 50)
    geoms = [g for g, _ in load_truth(labels_path(DEMO)).regions[::7]]
    k = len(geoms)
    geoms += [shapely.box(25, 25, 325, 175),  # edges through cell centres
              shapely.box(-500, -500, 80, 80), shapely.box(9000, 9000, 9100, 9100),  # partly, wholly outside
              *(shapely.Point(rng.uniform(0, 3651), rng.uniform(0, 2701)).buffer(rng.uniform(10, 400))
                for _ in range(20))]
    region, rr, cc = grid.cells_with_centre_in_each(geoms)
    all_r, all_c = np.indices(grid.cell_shape).reshape(2, -1)
    for i, g in enumerate(geoms):
        inside = shapely.contains_xy(g, (all_c + 0.5) * 50, (all_r + 0.5) * 50)
        expected = sorted(zip(all_r[inside].tolist(), all_c[inside].tolist(), strict=True))
        assert sorted(zip(rr[region == i].tolist(), cc[region == i].tolist(), strict=True)) == expected
    # Centres 75..275 by 75..125 (those on the edges are out); 25..75 square; none.
    assert [int((region == k + j).sum()) for j in range(3)] == [10, 4, 0]
    assert len(region) > len(geoms) and grid.cells_with_centre_in_each([])[0].size == 0


def test_adaptive_threshold_follows_the_computed_cells_and_is_clamped(cache_dir: Path) -> None:
    from inference.context import ThresholdAdapt

    adapt = ThresholdAdapt(percentile=50.0, slope=1.0, reference=0.0, low=-1.0, high=1.0)
    assert adapt.shift(np.array([np.nan])) == 0.0  # nothing computed yet: the model's threshold
    assert adapt.shift(np.full(4, 0.5)) == pytest.approx(0.0)
    assert adapt.shift(np.full(4, 0.999)) == pytest.approx(1.0)  # clamped to the calibrated range
    prob = np.full((4, 4), 0.2, np.float32)
    hm = make_heatmap(np.where(np.arange(16).reshape(4, 4) < 8, prob, np.nan), threshold=0.5, adapt=adapt)
    first = hm.threshold
    assert first == pytest.approx(1 / (1 + np.exp(1.0)))  # median logit of 0.2 is -1.39, clamped to -1
    rr, cc = np.nonzero(~hm.patch_done)
    hm.add(rr, cc, np.full(len(rr), 0.9, np.float32))  # the rest of the slide arrives, scoring high
    # The cached shift was dropped with the new cells: median logit now (logit 0.2 + logit 0.9) / 2.
    assert hm.threshold == pytest.approx(1 / (1 + np.exp(-(np.log(0.25) + np.log(9)) / 2)), rel=1e-5)
    back = Heatmap.load(hm.save(cache_dir / "adapt.npz"))
    assert back.info == hm.info and back.threshold == pytest.approx(hm.threshold)
    assert hm.info.key() == make_heatmap(prob).info.key()  # thresholds are not in the cache key


BAD_TRUTH = {
    "empty.csv": b"",
    "columns.csv": b"a,b,c\n1,2,3\n",
    "broken.geojson": b'{"type": "FeatureCollection", "features": [',
    "tissue_only.geojson": dumps_geojson([Annotation(shapely.box(0, 0, 10, 10), "Tissue")]),
    "hostile.xml": b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><ASAP_Annotations>&b;</ASAP_Annotations>',
}


@pytest.mark.parametrize("name", sorted(BAD_TRUTH))
def test_bad_truth_files_get_one_sentence(name: str, tmp_path: Path, slide_mpp, capsys) -> None:
    bad = tmp_path / name
    bad.write_bytes(BAD_TRUTH[name])
    with pytest.raises(TruthError):
        load_truth(bad)
    rc = main(["evaluate", str(slide_mpp[0]), "--truth", str(bad), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("idc-viewer evaluate: error:")


def test_evaluate_cli_on_a_slide_with_truth(tmp_path: Path, slide_mpp, capsys) -> None:
    path, _ = slide_mpp  # 1500 x 1100 px at 0.5 um/px: 200 um cells are 400 px, 3 x 2 whole patches
    truth = tmp_path / "t.geojson"
    truth.write_bytes(dumps_geojson([Annotation(shapely.box(0, 0, 800, 400), "IDC"),
                                     Annotation(shapely.box(0, 400, 1200, 800), "Non-IDC")]))
    review = tmp_path / "review"
    rc = main(["evaluate", str(path), "--truth", str(truth), "--json", "--device", "cpu", "--disagreements", str(review)])
    assert rc == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    s = out["slides"][0]["per_patch"]
    assert (s["cells"], s["idc_cells"]) == (5, 2)  # cells (0,0),(0,1) IDC; (1,0..2) non-IDC
    assert out["mean"]["slides"] == 1
    # The disagreement regions cover exactly the false and missed cells of the map shown.
    shown = out["slides"][0]["context"] or s
    wrong = {FALSE_IDC: round((1 - shown["specificity"]) * 3), MISSED_IDC: round((1 - shown["sensitivity"]) * 2)}
    result = parse_geojson((review / "with_mpp.disagreements.geojson").read_bytes())
    colours = {c.name: c.color for c in DISAGREEMENT_CLASSES}
    assert result.annotations and all(colours[c.name] == c.color for c in result.classes)
    for cls, n in wrong.items():
        assert sum(a.geometry.area for a in result.annotations if a.cls == cls) == n * 400 * 400
    assert "wrote 1 disagreement file to" in captured.err
