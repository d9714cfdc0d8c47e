"""The one decision record: scored images decided by the threshold's comparison, unreadable ones flagged."""

from fsad_core.calibration import Threshold
from fsad_core.decision import Decision, decided, undecided

THRESHOLD = Threshold(1.5, "test", None, None)


def test_scored_images_are_decided_by_the_thresholds_own_comparison():
    decisions = decided(["a", "b", "c"], [1.0, 1.5, 2.0], THRESHOLD)
    assert decisions == [Decision("a", 1.0, False, 1.5), Decision("b", 1.5, False, 1.5), Decision("c", 2.0, True, 1.5)]
    assert [d.is_anomaly for d in decisions] == THRESHOLD.is_anomaly([1.0, 1.5, 2.0]).tolist()


def test_an_image_that_could_not_be_judged_is_flagged_with_its_reason_and_no_score():
    assert undecided("x.png", "x.png: not a recognised image format", THRESHOLD) == Decision(
        "x.png", None, True, 1.5, "x.png: not a recognised image format")
