"""Decision thresholds: calibrated from few normal images (unsupervised) or a labelled set.

A threshold is stored with the model together with its rule and expected error rates, so a
deployment knows what false-alarm rate it signed up for. Flagging follows `fsad_core.metrics`:
anomaly means ``score > threshold`` (strictly greater).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import precision_recall_curve

from .metrics import as_finite_scores, as_labels, lowest_threshold_within, rates_at_threshold

RULE_PREDICTION_BOUND = "normal_prediction_bound"
RULE_SYNTHETIC_GAP = "synthetic_gap"
RULE_SUPERVISED_F1 = "supervised_f1"
RULE_SINGLE_IMAGE = "single_image_midpoint"

# Fewer leave-one-out scores than this give no spread one can put a tail on (two scores: their
# half-difference), so their threshold is provisional; at k = 2 the bound missed its target badly
# in both directions (docs/measurements.md, section 10).
MIN_NORMALS_FOR_TAIL = 4
# Below MIN_NORMALS_FOR_TAIL the synthetic-gap refinement may trade false alarms for recall only
# down to the prediction bound at this many times the target false-alarm rate.
SMALL_K_GAP_FALSE_ALARM_FACTOR = 5


def check_false_alarm_target(rate: float) -> None:
    """A target false-alarm rate is a share of normal images strictly between 0 and 1."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"target_false_alarm_rate must be in (0, 1), got {rate}")


def _json_safe(value: Any) -> Any:
    """Plain Python containers and scalars (numpy scalars/arrays converted) for json.dumps."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Threshold:
    """A decision threshold with the rule that chose it and the error rates it is expected to have."""

    value: float
    rule: str
    expected_false_alarm_rate: float | None
    expected_miss_rate: float | None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not math.isfinite(self.value):
            raise ValueError(f"threshold value must be finite, got {self.value}")

    def with_details(self, **more: Any) -> Threshold:
        """The same threshold with more details: a threshold is never changed once made."""
        return replace(self, details={**self.details, **more})

    def is_anomaly(self, scores: np.ndarray | list[float]) -> np.ndarray:
        """Bool flags, ``score > value``: the one comparison used by metrics and calibration."""
        return np.asarray(scores, dtype=np.float64) > self.value

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": float(self.value),
            "rule": self.rule,
            "expected_false_alarm_rate": _optional_float(self.expected_false_alarm_rate),
            "expected_miss_rate": _optional_float(self.expected_miss_rate),
            "details": _json_safe(self.details),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Threshold:
        return cls(
            value=float(data["value"]),
            rule=str(data["rule"]),
            expected_false_alarm_rate=_optional_float(data.get("expected_false_alarm_rate")),
            expected_miss_rate=_optional_float(data.get("expected_miss_rate")),
            details=dict(data.get("details") or {}),
        )


def calibrate_unsupervised(normal_scores: np.ndarray | list[float],
                           synthetic_scores: np.ndarray | list[float] | None = None,
                           target_false_alarm_rate: float = 0.01, *,
                           min_relative_spread: float = 0.1, min_spread: float = 0.0,
                           views_of_one_image: bool = False) -> Threshold:
    """Threshold from leave-one-out scores of the k normal images (k >= 1), optionally refined
    with scores of synthesized anomalies.

    Rule (``normal_prediction_bound``):
      1. Treat the k normal scores as a sample from a Gaussian: centre = their mean, spread = their
         standard deviation (ddof = 1), floored at ``min_relative_spread`` * |mean| so that
         identical scores still leave a margin, and at ``min_spread``, a spread the caller knows
         the score has from how it is built (the fused score: `detector.fused_spread_floor`).
      2. tail = the upper 1 - target prediction bound for one new normal image:
         centre + t(1 - target; k - 1 degrees of freedom) * spread * sqrt(1 + 1/k). Over draws of
         the k scores it flags a fraction ``target`` of new normal images on average. A normal
         quantile with a spread estimated from four scores (the earlier rule) flags several times
         the target: the estimate is as often too small as too large, and too small costs more.
      3. Guard: the threshold may flag at most floor(k * target) of the calibration normals, so it
         is at least the (floor(k * target) + 1)-th largest normal score. For few shots
         (k * target < 1) that is the max normal score: no calibration normal is ever flagged.
    Refinement with synthetic anomalies (``synthetic_gap``): if the threshold misses more than half
    of them, and a clear gap exists, i.e. their lower decile exceeds the guard by at least the
    normal spread, the threshold moves down to the middle of the gap (guard + lower decile) / 2.
    It never moves up and never below the guard. With fewer than ``MIN_NORMALS_FOR_TAIL`` normal
    scores the spread it measures the gap in is a floor, not an estimate, so there it stops at the
    prediction bound for ``SMALL_K_GAP_FALSE_ALARM_FACTOR`` times the target: uncapped, a gap of
    one floor put thresholds at k = 2 among the normal images, while off, it let most defects pass
    on sets whose synthetic and real defects stand far above the normal images (docs/measurements.md).
    With ``views_of_one_image`` (k = 1: the "normal" scores are held-out augmented views of the only
    image) they understate how far other normal images score, and a threshold from them flags
    nearly every real normal image. Then (``single_image_midpoint``) the threshold is at least the
    midpoint between the highest view score and the median synthetic anomaly, its false-alarm
    rate is unknown (None), and ``details["provisional"]`` says so: more normal images, or a
    labelled evaluation set, are what calibrate it properly.
    With 2 or 3 normal images (fewer than ``MIN_NORMALS_FOR_TAIL``) the rule is the same but the
    threshold is provisional too and its false-alarm rate unknown: their spread is no estimate.
    Expected false-alarm rate is the predictive (Student t) tail mass above the threshold; expected
    miss rate is the fraction of synthetic scores <= threshold (None without synthetic scores).
    """
    check_false_alarm_target(target_false_alarm_rate)
    if min_relative_spread < 0 or min_spread < 0:
        raise ValueError(f"min_relative_spread and min_spread must be >= 0, got {min_relative_spread}, {min_spread}")
    normal = as_finite_scores(normal_scores, "normal_scores")
    synthetic = None if synthetic_scores is None else as_finite_scores(synthetic_scores, "synthetic_scores")

    k = normal.size
    too_few_normals = k < MIN_NORMALS_FOR_TAIL and not views_of_one_image  # a spread that is no estimate
    centre = float(normal.mean())
    sample_spread = float(normal.std(ddof=1)) if k > 1 else 0.0
    spread = max(sample_spread, min_relative_spread * abs(centre), min_spread)
    predictive_spread = spread * math.sqrt(1.0 + 1.0 / k)
    dof = max(k - 1, 1)  # one score has no spread of its own; the floor stands in for it
    quantile = float(stats.t.isf(target_false_alarm_rate, dof))
    tail = centre + quantile * predictive_spread
    guard = lowest_threshold_within(normal, target_false_alarm_rate)
    value, rule = max(tail, guard), RULE_PREDICTION_BOUND

    details: dict[str, Any] = {
        "k": k, "target_false_alarm_rate": target_false_alarm_rate, "centre": centre,
        "spread": spread, "sample_spread": sample_spread, "min_spread": min_spread,
        "predictive_spread": predictive_spread,
        "t_quantile": quantile, "degrees_of_freedom": dof,
        "tail_threshold": tail, "guard": guard, "guard_applied": guard > tail,
        "max_normal_score": float(normal.max()),
    }
    expected_miss = None
    if synthetic is not None:
        details["n_synthetic"] = synthetic.size
        gap_top = float(np.quantile(synthetic, 0.1))
        details["synthetic_lower_decile"] = gap_top
        if np.mean(synthetic <= value) > 0.5 and gap_top - guard >= spread:
            midpoint = details["synthetic_gap_midpoint"] = (guard + gap_top) / 2.0
            value, rule = midpoint, RULE_SYNTHETIC_GAP
            if too_few_normals:
                loosest = min(0.5, SMALL_K_GAP_FALSE_ALARM_FACTOR * target_false_alarm_rate)
                value = max(midpoint, centre + float(stats.t.isf(loosest, dof)) * predictive_spread)
        if views_of_one_image:
            value, rule = max(value, (float(normal.max()) + float(np.median(synthetic))) / 2.0), RULE_SINGLE_IMAGE
        expected_miss = float(np.mean(synthetic <= value))

    expected_far: float | None
    provisional_reason = None
    if views_of_one_image:
        provisional_reason = "one normal image: its augmented views understate how much normal images differ"
    elif too_few_normals:
        provisional_reason = (f"{k} normal images: the spread of so few leave-one-out scores does not tell "
                              "how far other normal images score")
    if provisional_reason:
        expected_far = None
        details["provisional"] = True
        details["provisional_reason"] = provisional_reason + "; calibrate with more normal images or a labelled set"
    else:
        expected_far = float(stats.t.sf((value - centre) / predictive_spread, dof)) if predictive_spread > 0 else 0.0
    return Threshold(float(value), rule, expected_far, expected_miss, details)


def calibrate_supervised(scores: np.ndarray | list[float], labels: np.ndarray | list[int]) -> Threshold:
    """F1-optimal threshold on a labelled validation set (label 1 = defect), both classes required.

    Among F1-optimal cut points the highest is taken (fewest false alarms). The value is the
    midpoint between the lowest flagged score and the next lower distinct score, so that
    ``score > value`` reproduces the optimum with the widest margin.
    """
    s = as_finite_scores(scores)
    y = as_labels(labels, s.size)
    if np.unique(y).size < 2:
        raise ValueError("calibrate_supervised needs both normal (0) and defect (1) labels in the validation set")
    precision, recall, cuts = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.flatnonzero(f1 == f1.max())[-1])  # cuts increase: last = highest
    lowest_flagged = float(cuts[best])
    below = s[s < lowest_flagged]
    if below.size:
        lower = float(below.max())
        value = lower + (lowest_flagged - lower) / 2.0
        if not lower <= value < lowest_flagged:  # adjacent floats: the midpoint rounds up
            value = lower
    else:
        value = float(np.nextafter(lowest_flagged, -np.inf))
    rates = rates_at_threshold(y, s, value)
    return Threshold(value, RULE_SUPERVISED_F1, rates["false_alarm_rate"], rates["miss_rate"], rates)
