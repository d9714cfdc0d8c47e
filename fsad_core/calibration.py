"""Decision thresholds, calibrated from the held-out scores of few normal images (unsupervised).

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

from .metrics import as_finite_scores, lowest_threshold_within

RULE_PREDICTION_BOUND = "normal_prediction_bound"
RULE_SYNTHETIC_GAP = "synthetic_gap"
RULE_SINGLE_IMAGE = "single_image_midpoint"
RULE_MISS_TARGET = "miss_rate_target"

# Fewer leave-one-out scores than this give no spread one can put a tail on (two scores: their
# half-difference), so their threshold is provisional; at k = 2 the bound missed its target badly
# in both directions (measured: docs/measurements.md).
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


@dataclass(frozen=True)
class PredictionBound:
    """What k normal scores say about one more normal image's score: a Student t centred on their
    mean, with their spread widened for the error of that mean, and the guard on the scores themselves."""

    target_false_alarm_rate: float
    centre: float
    sample_spread: float
    spread: float
    predictive_spread: float
    degrees_of_freedom: int
    guard: float

    def t_quantile(self, rate: float) -> float:
        """How many predictive spreads above the centre a share `rate` of new normal scores lies."""
        return float(stats.t.isf(rate, self.degrees_of_freedom))

    def upper_bound_at(self, rate: float) -> float:
        """The upper prediction bound at another false-alarm rate, for stops looser than the target."""
        return self.centre + self.t_quantile(rate) * self.predictive_spread

    @property
    def tail(self) -> float:
        """The upper prediction bound at the target: the threshold the k scores alone ask for."""
        return self.upper_bound_at(self.target_false_alarm_rate)

    @property
    def guard_applied(self) -> bool:
        """Whether the tail would flag more calibration normals than the target allows."""
        return self.guard > self.tail

    @property
    def threshold(self) -> float:
        """The tail, never below the guard: a threshold must not flag its own normal images."""
        return max(self.tail, self.guard)

    def false_alarm_rate(self, value: float) -> float:
        """The predictive tail mass above `value`: the share of new normal images it flags on average."""
        return predictive_tail(value, self.centre, self.predictive_spread, self.degrees_of_freedom)


def predictive_tail(value: float, centre: float, predictive_spread: float, degrees_of_freedom: int) -> float:
    """The Student t tail mass above ``value``: the share of new normal scores above it."""
    if predictive_spread <= 0:
        return 0.0
    return float(stats.t.sf((value - centre) / predictive_spread, degrees_of_freedom))


def prediction_bound(normal: np.ndarray, target_false_alarm_rate: float, *,
                     min_relative_spread: float, min_spread: float) -> PredictionBound:
    """The prediction bound of the k normal scores, with the spread floored so identical scores still
    leave a margin and a spread known from how the score is built is never undercut."""
    k = normal.size
    centre = float(normal.mean())
    sample_spread = float(normal.std(ddof=1)) if k > 1 else 0.0
    spread = max(sample_spread, min_relative_spread * abs(centre), min_spread)
    return PredictionBound(
        target_false_alarm_rate=target_false_alarm_rate, centre=centre, sample_spread=sample_spread,
        spread=spread, predictive_spread=spread * math.sqrt(1.0 + 1.0 / k),
        degrees_of_freedom=max(k - 1, 1),  # one score has no spread of its own; the floor stands in for it
        guard=lowest_threshold_within(normal, target_false_alarm_rate),
    )


def spread_is_no_estimate(k: int, views_of_one_image: bool) -> bool:
    """Fewer than MIN_NORMALS_FOR_TAIL leave-one-out scores: their spread is a floor, not an estimate,
    which both caps the synthetic-gap refinement and makes the threshold provisional."""
    return k < MIN_NORMALS_FOR_TAIL and not views_of_one_image


def synthetic_gap_midpoint(bound: PredictionBound, synthetic: np.ndarray, lower_decile: float) -> float | None:
    """The middle of a clear gap between the guard and the synthetic anomalies' lower decile, when the
    bound misses most of them (None otherwise): there a lower threshold catches defects at little cost."""
    if np.mean(synthetic <= bound.threshold) > 0.5 and lower_decile - bound.guard >= bound.spread:
        return (bound.guard + lower_decile) / 2.0
    return None


def gap_threshold(bound: PredictionBound, midpoint: float, too_few_normals: bool) -> float:
    """The gap's middle, but with too few normals no lower than the bound for a looser target: a gap
    measured in a spread that is only a floor is no evidence that new normal images stay below it."""
    if not too_few_normals:
        return midpoint
    loosest = min(0.5, SMALL_K_GAP_FALSE_ALARM_FACTOR * bound.target_false_alarm_rate)
    return max(midpoint, bound.upper_bound_at(loosest))


def single_image_midpoint(views: np.ndarray, synthetic: np.ndarray) -> float:
    """Midway between the highest view and the median synthetic anomaly: views of one image understate
    how far other normal images score, so the threshold keeps a margin above them."""
    return (float(views.max()) + float(np.median(synthetic))) / 2.0


@dataclass(frozen=True)
class SyntheticRefinement:
    """The threshold after the synthetic anomalies had their say, and what they showed."""

    value: float
    rule: str
    n_synthetic: int
    lower_decile: float
    gap_midpoint: float | None


def refine_with_synthetic(bound: PredictionBound, normal: np.ndarray, synthetic: np.ndarray, *,
                          too_few_normals: bool, views_of_one_image: bool) -> SyntheticRefinement:
    """Synthetic anomalies are the only defects calibration sees: they show when the bound lets most
    defects pass, and, for views of one image, how far above the views a threshold must stay."""
    lower_decile = float(np.quantile(synthetic, 0.1))
    midpoint = synthetic_gap_midpoint(bound, synthetic, lower_decile)
    value, rule = bound.threshold, RULE_PREDICTION_BOUND
    if midpoint is not None:
        value, rule = gap_threshold(bound, midpoint, too_few_normals), RULE_SYNTHETIC_GAP
    if views_of_one_image:
        value, rule = max(value, single_image_midpoint(normal, synthetic)), RULE_SINGLE_IMAGE
    return SyntheticRefinement(value, rule, synthetic.size, lower_decile, midpoint)


def provisional_reason(k: int, views_of_one_image: bool) -> str | None:
    """Why the threshold's false-alarm rate is unknown (None when it is known), so a deployment is
    told to calibrate again rather than trust a rate the normal scores cannot give."""
    if views_of_one_image:
        reason = "one normal image: its augmented views understate how much normal images differ"
    elif spread_is_no_estimate(k, views_of_one_image):
        reason = (f"{k} normal images: the spread of so few leave-one-out scores does not tell "
                  "how far other normal images score")
    else:
        return None
    return reason + "; calibrate with more normal images or a labelled set"


def _unsupervised_details(normal: np.ndarray, bound: PredictionBound, min_spread: float,
                          refinement: SyntheticRefinement | None, reason: str | None) -> dict[str, Any]:
    """Everything the threshold was derived from, stored with it so a deployment can retrace the rule."""
    details: dict[str, Any] = {
        "k": normal.size, "target_false_alarm_rate": bound.target_false_alarm_rate, "centre": bound.centre,
        "spread": bound.spread, "sample_spread": bound.sample_spread, "min_spread": min_spread,
        "predictive_spread": bound.predictive_spread,
        "t_quantile": bound.t_quantile(bound.target_false_alarm_rate),
        "degrees_of_freedom": bound.degrees_of_freedom,
        "tail_threshold": bound.tail, "guard": bound.guard, "guard_applied": bound.guard_applied,
        "max_normal_score": float(normal.max()),
    }
    if refinement is not None:
        details["n_synthetic"] = refinement.n_synthetic
        details["synthetic_lower_decile"] = refinement.lower_decile
        if refinement.gap_midpoint is not None:
            details["synthetic_gap_midpoint"] = refinement.gap_midpoint
    if reason is not None:
        details["provisional"] = True
        details["provisional_reason"] = reason
    return details


def _check_spread_floors(min_relative_spread: float, min_spread: float) -> None:
    """A spread floor is a spread: never negative."""
    if min_relative_spread < 0 or min_spread < 0:
        raise ValueError(f"min_relative_spread and min_spread must be >= 0, got {min_relative_spread}, {min_spread}")


def calibrate_unsupervised(normal_scores: np.ndarray | list[float],
                           synthetic_scores: np.ndarray | list[float] | None = None,
                           target_false_alarm_rate: float = 0.01, *,
                           min_relative_spread: float = 0.1, min_spread: float = 0.0,
                           views_of_one_image: bool = False) -> Threshold:
    """Threshold from leave-one-out scores of the k normal images (k >= 1), optionally refined
    with scores of synthesized anomalies.

    Rule (``normal_prediction_bound``, `prediction_bound`):
      1. Treat the k normal scores as a sample from a Gaussian: centre = their mean, spread = their
         standard deviation (ddof = 1), floored at ``min_relative_spread`` * |mean| so that
         identical scores still leave a margin, and at ``min_spread``, a spread the caller knows
         the score has from how it is built (the fused score: `fusion.fused_spread_floor`).
      2. tail = the upper 1 - target prediction bound for one new normal image:
         centre + t(1 - target; k - 1 degrees of freedom) * spread * sqrt(1 + 1/k). Over draws of
         the k scores it flags a fraction ``target`` of new normal images on average. A normal
         quantile with a spread estimated from four scores (the earlier rule) flags several times
         the target: the estimate is as often too small as too large, and too small costs more.
      3. Guard: the threshold may flag at most floor(k * target) of the calibration normals, so it
         is at least the (floor(k * target) + 1)-th largest normal score. For few shots
         (k * target < 1) that is the max normal score: no calibration normal is ever flagged.
    Refinement with synthetic anomalies (``synthetic_gap``, `refine_with_synthetic`): if the
    threshold misses more than half of them, and a clear gap exists, i.e. their lower decile exceeds
    the guard by at least the normal spread, the threshold moves down to the middle of the gap
    (guard + lower decile) / 2. It never moves up and never below the guard. With fewer than
    ``MIN_NORMALS_FOR_TAIL`` normal scores the spread it measures the gap in is a floor, not an
    estimate, so there it stops at the prediction bound for ``SMALL_K_GAP_FALSE_ALARM_FACTOR`` times
    the target: uncapped, a gap of one floor put thresholds at k = 2 among the normal images, while
    off, it let most defects pass on sets whose synthetic and real defects stand far above the
    normal images (docs/measurements.md).
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
    _check_spread_floors(min_relative_spread, min_spread)
    normal = as_finite_scores(normal_scores, "normal_scores")
    synthetic = None if synthetic_scores is None else as_finite_scores(synthetic_scores, "synthetic_scores")

    bound = prediction_bound(normal, target_false_alarm_rate,
                             min_relative_spread=min_relative_spread, min_spread=min_spread)
    value, rule, refinement = bound.threshold, RULE_PREDICTION_BOUND, None
    if synthetic is not None:
        refinement = refine_with_synthetic(
            bound, normal, synthetic, too_few_normals=spread_is_no_estimate(normal.size, views_of_one_image),
            views_of_one_image=views_of_one_image)
        value, rule = refinement.value, refinement.rule
    reason = provisional_reason(normal.size, views_of_one_image)
    return Threshold(
        float(value), rule,
        expected_false_alarm_rate=None if reason else bound.false_alarm_rate(value),
        expected_miss_rate=None if synthetic is None else float(np.mean(synthetic <= value)),
        details=_unsupervised_details(normal, bound, min_spread, refinement, reason),
    )


def _just_below(score: float, scores: np.ndarray) -> float:
    """Midway between ``score`` and the next lower of ``scores`` (or a small relative margin below
    it): a defect caught by a hair would pass again on a rescore that rounds differently."""
    lower = scores[scores < score]
    return float((score + lower[-1]) / 2) if lower.size else score - 1e-4 * max(abs(score), 1e-6)


def lower_to_miss_target(threshold: Threshold, defect_scores: np.ndarray | list[float], target: float) -> Threshold:
    """``threshold`` lowered until at most a share ``target`` of the confirmed defects' scores pass
    (at or below it), never raised: a miss-rate target is paid for in false alarms, never in
    defects the false-alarm target caught. The defects must be ones the model never trained on.
    The expected false-alarm rate is the normal scores' predictive tail above the new value (None
    where the threshold was provisional); the expected miss rate, the share of these defects."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"miss-rate target must be in [0, 1), got {target}")
    defects = np.sort(as_finite_scores(defect_scores, "defect_scores"))
    first_caught = float(defects[math.floor(target * defects.size + 1e-9)])  # it and every defect above are flagged
    details = {**threshold.details, "miss_rate_target": target, "n_defects": int(defects.size),
               "false_alarm_threshold": threshold.value}
    if first_caught > threshold.value:  # the false-alarm target already catches enough of them
        return replace(threshold, expected_miss_rate=float(np.mean(defects <= threshold.value)), details=details)
    value = _just_below(first_caught, defects)
    tail = None if threshold.details.get("provisional") or "centre" not in threshold.details else predictive_tail(
        value, threshold.details["centre"], threshold.details["predictive_spread"],
        threshold.details["degrees_of_freedom"])
    return Threshold(value, RULE_MISS_TARGET, tail, float(np.mean(defects <= value)), details)
