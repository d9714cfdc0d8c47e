import json

import numpy as np
import pytest
from scipy import stats

from fsad_core.calibration import (
    MIN_NORMALS_FOR_TAIL,
    RULE_MISS_TARGET,
    RULE_PREDICTION_BOUND,
    RULE_SINGLE_IMAGE,
    RULE_SYNTHETIC_GAP,
    SMALL_K_GAP_FALSE_ALARM_FACTOR,
    Threshold,
    calibrate_unsupervised,
    gap_threshold,
    lower_to_miss_target,
    prediction_bound,
    provisional_reason,
    refine_with_synthetic,
    single_image_midpoint,
    synthetic_gap_midpoint,
)


def test_gaussian_normals_give_the_gaussian_quantile():
    rng = np.random.default_rng(0)
    t = calibrate_unsupervised(rng.normal(size=20_000), target_false_alarm_rate=0.05)
    assert t.rule == RULE_PREDICTION_BOUND
    assert t.value == pytest.approx(1.645, abs=0.05)
    fresh = rng.normal(size=50_000)
    assert np.mean(t.is_anomaly(fresh)) == pytest.approx(0.05, abs=0.01)
    assert t.expected_false_alarm_rate == pytest.approx(0.05, abs=0.005)


@pytest.mark.parametrize("k", [4, 8])
def test_the_bound_flags_the_target_share_of_new_normals_on_average(k):
    # Over many draws of k Gaussian normal scores, the share of new normal images above the
    # threshold averages the target. A normal quantile with a spread from k scores flags several
    # times as many (about 9 % instead of 1 % at k = 4): its spread is often too small.
    rng = np.random.default_rng(5)
    values = np.array([calibrate_unsupervised(rng.normal(size=k)).value for _ in range(4000)])
    assert np.mean(stats.norm.sf(values)) == pytest.approx(0.01, abs=0.002)


def test_a_spread_known_from_the_score_floors_the_sample_spread():
    # Two equal scores have no spread of their own; a caller that knows the score's spread says so.
    t = calibrate_unsupervised([0.0, 0.0], min_spread=2 ** 0.5)
    assert t.details["spread"] == pytest.approx(2 ** 0.5) and t.details["sample_spread"] == 0.0
    assert t.value == pytest.approx(stats.t.isf(0.01, 1) * 2 ** 0.5 * 1.5 ** 0.5)
    assert calibrate_unsupervised([0.0, 0.0]).value == 0.0  # without it: the scores' own mean
    with pytest.raises(ValueError, match="min_spread"):
        calibrate_unsupervised([0.0, 1.0], min_spread=-1.0)


@pytest.mark.parametrize("k", [2, 3])
def test_with_too_few_normals_the_synthetic_gap_stops_at_a_looser_bound(k):
    # From two or three scores the spread is a floor: a gap of one floor is no evidence that new
    # normal images stay below its middle, so the threshold stops at the bound for 5x the target.
    normals = np.zeros(k)
    near = calibrate_unsupervised(normals, np.linspace(2.0, 4.0, 16), min_spread=2 ** 0.5)
    spread = near.details["predictive_spread"]
    assert near.rule == RULE_SYNTHETIC_GAP and near.value < near.details["tail_threshold"]
    assert near.value == pytest.approx(stats.t.isf(SMALL_K_GAP_FALSE_ALARM_FACTOR * 0.01, k - 1) * spread)
    assert near.value > near.details["synthetic_gap_midpoint"] and near.details["provisional"]
    # A gap whose middle lies above that bound: the middle, as with more images.
    far = calibrate_unsupervised(normals, np.linspace(2.1, 2.4, 16) * near.value, min_spread=2 ** 0.5)
    assert far.rule == RULE_SYNTHETIC_GAP and far.value == far.details["synthetic_gap_midpoint"] > near.value


@pytest.mark.parametrize("normals", [[7.3], [7.3, 7.31], [5.0, 9.0], [0.0], [-2.0, -2.0]])
def test_few_shots_never_flag_a_normal(normals):
    t = calibrate_unsupervised(normals)
    assert np.isfinite(t.value)
    assert t.value >= max(normals)
    assert not t.is_anomaly(normals).any()
    if max(normals) > 0:
        assert t.value > max(normals)


def test_sixteen_shots_guard_against_the_max():
    normals = np.r_[np.full(15, 1.0), 50.0]  # one outlying normal: the guard never flags it
    t = calibrate_unsupervised(normals, target_false_alarm_rate=0.01)
    assert t.value >= 50.0 and t.details["guard_applied"]


def test_synthetic_gap_lowers_a_too_conservative_threshold():
    rng = np.random.default_rng(1)
    normals = 10 + rng.normal(0, 1, 4)
    tail = calibrate_unsupervised(normals, target_false_alarm_rate=1e-6)
    synthetic = tail.value - 2 + rng.normal(0, 0.3, 50)  # above the normals, mostly below the tail threshold
    t = calibrate_unsupervised(normals, synthetic, target_false_alarm_rate=1e-6)
    assert t.rule == RULE_SYNTHETIC_GAP
    assert normals.max() < t.value < np.quantile(synthetic, 0.1)
    assert t.expected_miss_rate <= 0.1
    assert t.expected_false_alarm_rate > tail.expected_false_alarm_rate


def test_synthetic_without_gap_keeps_the_tail_and_reports_misses():
    normals = [10.0, 10.5, 11.0]
    synthetic = [9.0, 10.2, 10.8, 30.0]
    t = calibrate_unsupervised(normals, synthetic)
    assert t.rule == RULE_PREDICTION_BOUND
    assert t.value == calibrate_unsupervised(normals).value
    assert t.expected_miss_rate == 0.75


def test_one_image_threshold_sits_between_its_views_and_the_synthetic_anomalies_and_is_provisional():
    views = np.random.default_rng(3).normal(1.0, 0.1, size=32)  # tight: views of one image
    synthetic = np.linspace(8.0, 12.0, 16)
    t = calibrate_unsupervised(views, synthetic, views_of_one_image=True)
    assert t.rule == RULE_SINGLE_IMAGE and t.value == pytest.approx((views.max() + 10.0) / 2)
    assert t.expected_false_alarm_rate is None and t.details["provisional"] is True
    assert t.expected_miss_rate == 0.0
    assert calibrate_unsupervised(views, synthetic).value < t.value  # the views alone would flag far more


@pytest.mark.parametrize("k", [2, 3, MIN_NORMALS_FOR_TAIL])
def test_too_few_normals_make_a_provisional_threshold_with_unknown_false_alarms(k):
    normals = 10 + np.random.default_rng(4).normal(0, 1, k)
    t = calibrate_unsupervised(normals, np.linspace(20.0, 30.0, 16))
    assert t.rule in (RULE_PREDICTION_BOUND, RULE_SYNTHETIC_GAP) and t.value > normals.max()
    if k < MIN_NORMALS_FOR_TAIL:
        assert t.expected_false_alarm_rate is None and t.details["provisional"] is True
        assert f"{k} normal images" in t.details["provisional_reason"]
    else:
        assert t.expected_false_alarm_rate is not None and "provisional" not in t.details


def _bound(normals, target=0.01, min_spread=0.0):
    return prediction_bound(np.asarray(normals, dtype=np.float64), target, min_relative_spread=0.1,
                            min_spread=min_spread)


def test_the_bound_is_a_student_t_bound_on_the_predictive_spread():
    # [0, 0, 0, 1]: mean 0.25, sd 0.5, so 0.25 + t(0.99; 3) * 0.5 * sqrt(1 + 1/4) = 2.7883.
    bound = _bound([0.0, 0.0, 0.0, 1.0])
    assert (bound.centre, bound.spread, bound.degrees_of_freedom) == (0.25, 0.5, 3)
    assert bound.predictive_spread == pytest.approx(0.5 * 1.25 ** 0.5)
    assert bound.t_quantile(0.01) == pytest.approx(4.5407, abs=1e-4)
    assert bound.tail == pytest.approx(2.7883, abs=1e-4)
    assert bound.guard == 1.0 and not bound.guard_applied and bound.threshold == bound.tail
    assert bound.false_alarm_rate(bound.tail) == pytest.approx(0.01)
    assert _bound([3.0], min_spread=0.0).false_alarm_rate(3.0) == pytest.approx(0.5)
    assert _bound([0.0, 0.0]).false_alarm_rate(0.0) == 0.0  # no spread at all: nothing above flags


def test_the_guard_lifts_a_tail_that_would_flag_a_calibration_normal():
    # At a 20 % target the tail of [0, 0, 0, 1] is 0.25 + t(0.8; 3) * 0.559 = 0.797, below the
    # highest normal; with 4 * 0.2 < 1 calibration normal allowed, the guard is that highest one.
    bound = _bound([0.0, 0.0, 0.0, 1.0], target=0.2)
    assert bound.tail == pytest.approx(0.797, abs=1e-3)
    assert bound.guard == 1.0 and bound.guard_applied and bound.threshold == 1.0


def test_the_gap_midpoint_needs_a_bound_that_misses_most_and_a_gap_of_one_spread():
    bound = _bound([0.0, 0.0, 0.0, 1.0])  # threshold 2.79, guard 1, spread 0.5
    missed = np.linspace(2.0, 3.0, 11)  # lower decile 2.1: a gap of 1.1 above the guard
    assert synthetic_gap_midpoint(bound, missed, 2.1) == pytest.approx((1.0 + 2.1) / 2)
    caught = np.linspace(3.0, 4.0, 11)  # the bound already flags them all
    assert synthetic_gap_midpoint(bound, caught, 3.1) is None
    narrow = np.linspace(1.2, 2.2, 11)  # lower decile 1.3: a gap of 0.3, less than one spread
    assert synthetic_gap_midpoint(bound, narrow, 1.3) is None


def test_with_too_few_normals_the_gap_stops_at_the_bound_for_a_looser_target():
    bound = _bound([0.0, 0.0], min_spread=2 ** 0.5)  # predictive spread sqrt(2) * sqrt(1.5) = 1.732
    stop = stats.t.isf(SMALL_K_GAP_FALSE_ALARM_FACTOR * 0.01, 1) * 3 ** 0.5  # t(0.95; 1) = 6.314
    assert gap_threshold(bound, 0.0, too_few_normals=True) == pytest.approx(stop)
    assert gap_threshold(bound, 50.0, too_few_normals=True) == 50.0  # a middle above the stop stands
    assert gap_threshold(bound, 0.0, too_few_normals=False) == 0.0
    # The looser target is never above one half: the stop never goes below the centre.
    assert gap_threshold(_bound([0.0, 0.0], target=0.2, min_spread=1.0), -1.0, too_few_normals=True) == 0.0


def test_the_single_image_midpoint_lies_between_the_top_view_and_the_median_anomaly():
    assert single_image_midpoint(np.array([1.0, 3.0, 2.0]), np.array([10.0, 20.0, 60.0])) == 11.5


def test_for_one_image_the_midpoint_only_ever_raises_the_threshold():
    views = np.array([0.0, 0.0, 0.0, 1.0])
    bound = _bound(views)  # threshold 2.79
    low = refine_with_synthetic(bound, views, np.array([3.0, 3.5, 4.0]), too_few_normals=False,
                                views_of_one_image=True)  # midpoint 2.25: below the bound
    assert low.rule == RULE_SINGLE_IMAGE and low.value == bound.threshold and low.gap_midpoint is None
    high = refine_with_synthetic(bound, views, np.array([3.0, 9.0, 11.0]), too_few_normals=False,
                                 views_of_one_image=True)
    assert high.rule == RULE_SINGLE_IMAGE and high.value == 5.0


@pytest.mark.parametrize(("k", "views", "reason"), [
    (1, True, "one normal image"), (2, True, "one normal image"), (2, False, "2 normal images"),
    (3, False, "3 normal images"), (MIN_NORMALS_FOR_TAIL, False, None), (20, False, None),
])
def test_a_threshold_is_provisional_with_one_image_or_fewer_normals_than_a_tail_needs(k, views, reason):
    said = provisional_reason(k, views)
    if reason is None:
        assert said is None
    else:
        assert said.startswith(reason) and said.endswith("calibrate with more normal images or a labelled set")


@pytest.mark.parametrize("bad", [[], [1.0, np.nan], [np.inf]])
def test_unsupervised_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        calibrate_unsupervised(bad)
    with pytest.raises(ValueError):
        calibrate_unsupervised([1.0, 2.0], synthetic_scores=bad)


def test_threshold_json_round_trip():
    t = calibrate_unsupervised(np.array([1.0, 1.2, 0.9], dtype=np.float32), np.array([3.0, 4.0]))
    data = json.loads(json.dumps(t.to_dict()))
    assert Threshold.from_dict(data) == t
    with pytest.raises(ValueError):
        Threshold(float("nan"), "x", None, None)


def test_a_miss_rate_target_lowers_the_threshold_until_enough_defects_are_caught_and_never_raises_it():
    normal = np.random.default_rng(0).normal(0, 1, 16)
    threshold = calibrate_unsupervised(normal, target_false_alarm_rate=0.01)
    defects = np.array([-0.5, 0.0, 0.5, 1.0, 1.5, 5.0, 6.0, 7.0, 8.0, 9.0])  # half below the threshold
    assert np.mean(defects <= threshold.value) == 0.5
    for target, passing in ((0.0, 0), (0.1, 1), (0.25, 2), (0.45, 4)):
        lowered = lower_to_miss_target(threshold, defects, target)
        assert lowered.rule == RULE_MISS_TARGET and int(np.sum(defects <= lowered.value)) == passing
        assert lowered.value < threshold.value and lowered.expected_miss_rate == passing / 10
        assert lowered.expected_false_alarm_rate > threshold.expected_false_alarm_rate  # paid in false alarms
        assert lowered.details["false_alarm_threshold"] == threshold.value and lowered.details["n_defects"] == 10
    caught = lower_to_miss_target(threshold, defects + 10, 0.0)  # the false-alarm target already catches them
    assert caught.value == threshold.value and caught.rule == threshold.rule and caught.expected_miss_rate == 0.0
    many = np.linspace(-3, 1, 100)  # 0.29 * 100 is 28.999... in floating point: still 29 may pass
    assert int(np.sum(many <= lower_to_miss_target(threshold, many, 0.29).value)) == 29
    with pytest.raises(ValueError, match="miss-rate target"):
        lower_to_miss_target(threshold, defects, 1.0)
