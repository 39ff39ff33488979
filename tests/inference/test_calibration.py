"""Calibration of the calls and the slide-level answer, on synthetic maps with known truth."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from inference.calibration import calibrate
from inference.calls import (
    FOUND,
    NOT_FOUND,
    UNCERTAIN,
    SlideCallPolicy,
    call_of_text,
    call_text,
    fit_platt,
    fit_policy,
)
from inference.context import ThresholdAdapt, sigmoid
from inference.truth import Truth, agreement, cell_truth, disagreements
from tests.inference.test_slide_eval import make_heatmap


def _grid_truth(y: np.ndarray, name: str) -> Truth:
    regions = tuple((shapely.box(c * 50, r * 50, c * 50 + 50, r * 50 + 50), int(y[r, c]))
                    for r in range(y.shape[0]) for c in range(y.shape[1]))
    return Truth(regions, name)


def test_calibration_picks_context_when_neighbours_help() -> None:
    rng = np.random.default_rng(0)
    heatmaps, truths = [], []
    for i in range(4):
        y = np.zeros((20, 20), int)
        y[4:14, 3 + i : 12 + i] = 1  # a sheet of IDC
        noisy = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.3, y.shape), 0.01, 0.99).astype(np.float32)
        heatmaps.append(make_heatmap(noisy))
        truths.append(_grid_truth(y, f"s{i}"))
    cal = calibrate(heatmaps, truths)
    rows = {r["sigma"]: r for r in cal.table if r["percentile"] is None}  # fixed thresholds
    assert cal.sigma > 0 and rows[cal.sigma]["f1"] > rows[0.0]["f1"] + 0.05
    assert cal.slide_call is None and not cal.slide_scores  # no IDC-free slides, no slide call


def test_calibration_adapts_the_threshold_to_slides_whose_scores_are_shifted() -> None:
    """Each slide ranks its cells well, but its scores sit higher or lower as a whole: one fixed
    threshold fails some slides, a threshold that follows the slide's scores holds on all,
    also on slides it was not fitted on (the left-out figure)."""
    rng = np.random.default_rng(1)
    heatmaps, truths = [], []
    for i, shift in enumerate(np.linspace(-2.5, 2.5, 8)):
        y = (rng.random((12, 12)) < 0.3).astype(int)
        z = 2.0 * (y - 0.3) + rng.normal(0, 0.6, y.shape) + shift
        heatmaps.append(make_heatmap((1 / (1 + np.exp(-z))).astype(np.float32)))
        truths.append(_grid_truth(y, f"s{i}"))
    cal = calibrate(heatmaps, truths, sigmas=(0.0,))
    fixed = next(r for r in cal.table if r["percentile"] is None)
    chosen = max(cal.table, key=lambda r: r["loo_objective"])
    assert cal.adapt is not None and cal.adapt.percentile == chosen["percentile"] and cal.adapt.slope > 0.5
    assert chosen["loo_objective"] > fixed["loo_objective"] + 0.05
    for hm in heatmaps:
        adapted = make_heatmap(hm.raw_prob, threshold=cal.threshold, adapt=cal.adapt)
        assert (adapted.threshold > cal.threshold) == (cal.adapt.shift(hm.raw_prob) > 0)


def _idc_free_case(seed: int = 2) -> tuple[list, list, list]:
    """Slides with a sheet of IDC scored high, and IDC-free slides of the same tissue whose dense
    parts score in between, as carcinoma in situ and dense stroma do."""
    rng = np.random.default_rng(seed)
    heatmaps, truths, free = [], [], []
    for i in range(6):
        y = np.zeros((16, 16), int)
        y[2:12, 2 + i : 12 + i] = 1  # IDC over 40% of the slide, scored high but spread
        z = np.where(y == 1, 1.0 + rng.normal(0, 1.0, y.shape), rng.normal(-2.5, 0.8, y.shape))
        dense = rng.random(y.shape) < 0.05
        z = np.where(dense & (y == 0), rng.normal(0, 0.6, y.shape), z)
        heatmaps.append(make_heatmap(sigmoid(z).astype(np.float32)))
        truths.append(_grid_truth(y, f"s{i}"))
        zf = np.where(rng.random(y.shape) < 0.3, rng.normal(0, 0.6, y.shape), rng.normal(-2.5, 0.8, y.shape))
        free.append(make_heatmap(sigmoid(zf).astype(np.float32)))
    return heatmaps, truths, free


def test_idc_free_slides_keep_the_calls_off_benign_tissue() -> None:
    """With IDC-free slides in calibration the threshold rises until their tissue stays clear, at
    little cost in F1; balanced accuracy, which calibration no longer chooses by, would call more."""
    heatmaps, truths, free = _idc_free_case()
    alone = calibrate(heatmaps, truths, sigmas=(0.0,))
    both = calibrate(heatmaps, truths, free, sigmas=(0.0,))
    assert both.context_threshold > alone.context_threshold
    share = [float(np.mean(hm.raw_prob >= both.context_threshold)) for hm in free]
    share_alone = [float(np.mean(hm.raw_prob >= alone.context_threshold)) for hm in free]
    assert np.mean(share) < 0.5 * np.mean(share_alone)
    row = next(r for r in both.table if r["percentile"] is None)
    assert row["idc_free_called"] == pytest.approx(np.mean(share), abs=1e-4)
    # The threshold balanced accuracy would take on the slides with IDC is lower still.
    bac = {}
    for t in np.round(np.linspace(0.02, 0.98, 97), 2):
        vals = []
        for hm, truth in zip(heatmaps, truths, strict=True):
            labels, _ = cell_truth(hm.grid, truth)
            y, p = labels.ravel() == 1, hm.raw_prob.ravel()
            vals.append(0.5 * ((p[y] >= t).mean() + (p[~y] < t).mean()))
        bac[float(t)] = np.mean(vals)
    assert max(bac, key=bac.get) < both.context_threshold
    # The slide call is fitted: every slide with IDC scores above every IDC-free one here.
    assert both.slide_call is not None and both.slide_scores["pair_auc_by_top_cells"]


def test_the_adaptive_threshold_never_falls_below_its_floor() -> None:
    low_map = np.full((6, 6), 0.02, np.float32)  # an IDC-free slide: scores sit low
    high_map = np.full((6, 6), 0.95, np.float32)
    free = ThresholdAdapt(percentile=90.0, slope=0.5, reference=0.0, low=-4.0, high=4.0)
    floored = ThresholdAdapt(percentile=90.0, slope=0.5, reference=0.0, low=-4.0, high=4.0, min_shift=0.0)
    assert free.shift(low_map) < -1.0  # without a floor the threshold falls on the low slide
    assert floored.shift(low_map) == 0.0
    assert free.shift(high_map) > 0 and floored.shift(high_map) == pytest.approx(free.shift(high_map))  # it rises
    hm = make_heatmap(low_map, threshold=0.4, adapt=floored)
    assert hm.threshold == pytest.approx(0.4) and not hm.called.any()
    assert make_heatmap(low_map, threshold=0.4, adapt=free).threshold < 0.2


def test_platt_scaling_orders_and_fits() -> None:
    rng = np.random.default_rng(0)
    raw = np.r_[rng.uniform(0.05, 0.6, 40), rng.uniform(0.4, 0.98, 40)]
    y = np.r_[np.zeros(40), np.ones(40)]
    slope, intercept = fit_platt(raw, y)
    assert slope > 0
    p = sigmoid(slope * np.log(raw / (1 - raw)) + intercept)
    assert abs(p.mean() - y.mean()) < 0.02  # the fitted probabilities average to the slides' prevalence
    # Perfectly separated slides still give finite values.
    assert np.isfinite(fit_platt(np.r_[np.full(5, 0.1), np.full(5, 0.9)], np.r_[np.zeros(5), np.ones(5)])).all()


def test_slide_call_limits_keep_their_promises() -> None:
    rng = np.random.default_rng(4)
    pos, neg = rng.uniform(0.3, 0.99, 40), rng.uniform(0.02, 0.7, 40)
    policy = fit_policy(pos, neg, top_cells=5, sensitivity=0.95, specificity=0.95)
    scores_pos = [policy.score(np.array([[p]])) for p in pos]
    scores_neg = [policy.score(np.array([[p]])) for p in neg]
    assert np.mean([s >= policy.low for s in scores_pos]) >= 0.95  # slides with IDC are not cleared
    assert np.mean([s < policy.high for s in scores_neg]) >= 0.95  # IDC-free slides are rarely "found"
    calls = {policy.call(s) for s in scores_pos + scores_neg}
    assert calls == {FOUND, UNCERTAIN, NOT_FOUND}
    assert policy.call(0.999, out_of_domain=True) == UNCERTAIN and policy.call(None) == UNCERTAIN
    separated = fit_policy(np.full(4, 0.9), np.full(4, 0.1), top_cells=1)
    assert separated.low == separated.high  # no uncertain band where validation separates
    for call in (FOUND, NOT_FOUND, UNCERTAIN):
        assert call_of_text(call_text(call, "Metastasis")) == call
    with pytest.raises(ValueError):
        SlideCallPolicy(top_cells=0, slope=1.0, intercept=0.0, low=0.2, high=0.8)


def test_a_slide_called_free_has_no_calls_anywhere() -> None:
    """On a slide whose score is below the policy's low limit nothing is called: the map, its
    regions, the agreement and the disagreements all agree with the call."""
    from inference.annotations import regions_from_heatmap

    prob = np.full((8, 8), 0.05, np.float32)
    prob[2:4, 2:4] = 0.6  # above the cell threshold, but the slide's top cells are weak
    policy = SlideCallPolicy(top_cells=4, slope=1.0, intercept=0.0, low=0.7, high=0.9)
    hm = make_heatmap(prob, threshold=0.5, slide_call=policy)
    assert hm.slide_score == pytest.approx(0.6, abs=1e-6) and hm.slide_call() == NOT_FOUND
    assert hm.threshold == 0.5 and hm.call_threshold == float("inf") and not hm.called.any()
    assert regions_from_heatmap(hm) == [] and len(regions_from_heatmap(hm, 0.5)) == 1  # a chosen P still works
    y = np.zeros((8, 8), int)
    labels, _ = cell_truth(hm.grid, _grid_truth(y, "free"))
    a = agreement(hm, labels)
    assert a.metrics.fp == 0 and disagreements(hm, labels) == []
    # The same map with a strong core is called, and its cells are.
    prob[2:4, 2:4] = 0.95
    hm2 = make_heatmap(prob, threshold=0.5, slide_call=policy)
    assert hm2.slide_call() == FOUND and hm2.called.sum() == 4
