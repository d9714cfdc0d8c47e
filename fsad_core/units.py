"""The one score unit of every output: the model's own score moved and scaled so that its
threshold reads 0.5, ``0.5 + (score - threshold) / (2 |threshold|)``.

Monotone in the model's score and never clipped (ranking, AUROC and the review queue depend on
it), computed from the threshold the model already stores (model files and configuration hashes
stay as they are): a part is flagged above 0.5, and for the usual positive threshold 0 is a score
of 0 and 1.0 twice the threshold. The model's own scores stay available (`ScoreResult.raw_scores`,
`ScoreResult.components`) for experts.
"""

from __future__ import annotations

import numpy as np

UNIT = "t05"  # the unit's name, in keys of what is drawn from scores
AT_THRESHOLD = 0.5


def _scale(threshold: float) -> float:
    return abs(threshold) if abs(threshold) > 1e-12 else 1.0


def to_unit(raw: np.ndarray | float, threshold: float) -> np.ndarray | float:
    """The model's score(s) in the unit."""
    return AT_THRESHOLD + (np.asarray(raw, dtype=np.float64) - threshold) / (2 * _scale(threshold))


def from_unit(value: float, threshold: float) -> float:
    """A value of the unit as the model's own score (0.5 gives the threshold itself, exactly)."""
    return float(threshold + (value - AT_THRESHOLD) * 2 * _scale(threshold))
