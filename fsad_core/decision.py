"""The decision on one image: the record `fsad score`, the prefix scorer and the served model each
write in their own format, so that they can never disagree on what was decided."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .calibration import Threshold
from .units import AT_THRESHOLD, from_unit, to_unit


@dataclass(frozen=True)
class Decision:
    image: str
    score: float | None  # in the score unit (`fsad_core.units`); None when the image could not be judged
    is_anomaly: bool
    threshold: float  # in the score unit: 0.5 unless another was asked for
    error: str = ""  # why the image could not be judged


def decided(images: Sequence[str], raw_scores: Sequence[float], threshold: Threshold,
            cut: float = AT_THRESHOLD) -> list[Decision]:
    """The decisions on scored images (the model's own scores), flagged above ``cut`` in the unit:
    at 0.5 exactly `Threshold.is_anomaly`, as the comparison is made on the model's own score."""
    raw = np.asarray(raw_scores, dtype=np.float64)
    flags = raw > from_unit(cut, threshold.value)
    units = to_unit(raw, threshold.value)
    return [Decision(image, float(unit), bool(flag), cut) for image, unit, flag in zip(images, units, flags)]


def undecided(image: str, error: str, cut: float = AT_THRESHOLD) -> Decision:
    """An image that could not be judged is flagged: a part nobody could look at is not passed."""
    return Decision(image, None, True, cut, error)
