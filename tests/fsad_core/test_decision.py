"""The one decision record: scored images decided by the threshold's comparison and given in the
score unit, unreadable ones flagged."""

import numpy as np
import pytest

from fsad_core.calibration import Threshold
from fsad_core.decision import Decision, decided, undecided
from fsad_core.units import from_unit, to_unit

THRESHOLD = Threshold(1.5, "test", None, None)


def test_scored_images_are_decided_by_the_thresholds_own_comparison_and_read_in_the_unit():
    decisions = decided(["a", "b", "c"], [1.0, 1.5, 2.0], THRESHOLD)
    assert [d.score for d in decisions] == pytest.approx([1 / 3, 0.5, 2 / 3])
    assert [(d.image, d.is_anomaly, d.threshold, d.error) for d in decisions] == [
        ("a", False, 0.5, ""), ("b", False, 0.5, ""), ("c", True, 0.5, "")]
    assert [d.is_anomaly for d in decisions] == THRESHOLD.is_anomaly([1.0, 1.5, 2.0]).tolist()
    # a cut asked for in the unit decides on the model's own score at that level
    assert [d.is_anomaly for d in decided(["a", "b", "c"], [1.0, 1.5, 2.0], THRESHOLD, cut=0.4)] == [False, True, True]


def test_the_unit_is_monotone_unclipped_and_puts_any_threshold_at_one_half():
    raw = np.array([-50.0, -2.1, 0.0, 9.4, 16.9, 1e6])
    for threshold in (9.4, -3.0, 0.0, 1e-9):
        unit = to_unit(raw, threshold)
        assert (np.diff(unit) > 0).all() and unit.min() < 0 and unit.max() > 1  # nothing clipped
        assert to_unit(threshold, threshold) == 0.5 and from_unit(0.5, threshold) == threshold
        assert from_unit(float(to_unit(16.9, threshold)), threshold) == pytest.approx(16.9)


def test_an_image_that_could_not_be_judged_is_flagged_with_its_reason_and_no_score():
    assert undecided("x.png", "x.png: not a recognised image format") == Decision(
        "x.png", None, True, 0.5, "x.png: not a recognised image format")
