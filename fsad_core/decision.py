"""The decision on one image: the record `fsad score`, the prefix scorer and the served model each
write in their own format, so that they can never disagree on what was decided."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .calibration import Threshold

# The unit of every score a decision carries: the model's own score. What is drawn from scores
# (the review queue's pictures) is kept under it, so that another unit makes them anew.
SCORE_UNIT = "raw"


@dataclass(frozen=True)
class Decision:
    image: str
    score: float | None  # None when the image could not be judged
    is_anomaly: bool
    threshold: float
    error: str = ""  # why the image could not be judged


def decided(images: Sequence[str], scores: Sequence[float], threshold: Threshold) -> list[Decision]:
    """The decisions on scored images, by `Threshold.is_anomaly`."""
    flags = threshold.is_anomaly(list(scores))
    return [Decision(image, float(score), bool(flag), threshold.value)
            for image, score, flag in zip(images, scores, flags)]


def undecided(image: str, error: str, threshold: Threshold) -> Decision:
    """An image that could not be judged is flagged: a part nobody could look at is not passed."""
    return Decision(image, None, True, threshold.value, error)
