"""How the two score components are put in common units and combined into the `fused` and
`either` scores; a fit chooses the units (`fusion_scales`) and a model keeps them.

- `fused`: z(mahalanobis) + z(patch), each standardised by its leave-one-out normal scores. With
  one image there is no part-to-part spread to standardise by: the held-out views measure only
  augmentation noise, which fine-tuning removes on purpose (they spread far less than normal test
  images do, as measured in docs/measurements.md), so z-scores would hand the fusion to that component. At k = 1
  each component is instead put in units of the gap from the normal views to the median synthetic
  anomaly: 0 = the normal image, 1 = a typical synthetic defect, for both components alike;
- `either`: max(z(mahalanobis), z(patch)) in the same units: a part is as anomalous as the branch
  that finds it most so. A sum hands half the say to a branch that sees little on a product; the
  larger of the two lets the weaker branch add only where it stands out.
"""

from __future__ import annotations

import math

import numpy as np

COMBINED = ("fused", "either")  # scores made of the two components
FUSION_LOO = "z-scores over the leave-one-out normal scores"
FUSION_SYNTHETIC_GAP = "single image: units of the gap from the held-out views to the median synthetic anomaly"


def with_combined(components: dict[str, np.ndarray], fusion: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """The component scores (float64), with the combined ones added when there are two: `fused`,
    the sum of the components in the fusion's units, and `either`, the larger of them."""
    scores = {name: np.asarray(values, dtype=np.float64) for name, values in components.items()}
    if "mahalanobis" in scores:
        (mm, ms), (pm, ps) = fusion["mahalanobis"], fusion["patch"]
        z_maha, z_patch = (scores["mahalanobis"] - mm) / ms, (scores["patch"] - pm) / ps
        scores["fused"] = z_maha + z_patch
        scores["either"] = np.maximum(z_maha, z_patch)
    return scores


def fusion_scales(normal: dict[str, np.ndarray], synthetic: dict[str, np.ndarray] | None,
                  single_image: bool) -> tuple[dict[str, tuple[float, float]], str]:
    """(centre, scale) per component for the fused score, and the rule that chose them."""
    scales = {name: _mean_std(v) for name, v in normal.items()}
    if not single_image or synthetic is None:
        return scales, FUSION_LOO
    gaps = {name: float(np.median(synthetic[name])) - scales[name][0] for name in normal}
    # A component whose synthetic anomalies do not score above the normal views gives no unit.
    if min(gaps.values()) <= 0:
        return scales, FUSION_LOO
    return {name: (scales[name][0], max(gaps[name], scales[name][1])) for name in normal}, FUSION_SYNTHETIC_GAP


def fused_spread_floor(normal: dict[str, np.ndarray], fusion: dict[str, tuple[float, float]],
                       score: str = "fused") -> float:
    """The spread the fused leave-one-out scores would have if their components were uncorrelated.

    The fused score adds the components in units of their own leave-one-out spread, so the fused
    leave-one-out scores have spread sqrt(2 + 2 r), r the components' correlation over the same k
    images. From a few images r is a coin toss (at k = 2 it is +1 or -1: the two fused scores are
    then equal, the spread 0 and the threshold their mean, or the spread 2): a bound on those
    scores flags several times the target of new normal images (simulated in
    `tests/fsad_core/test_detector.py`). Two measures of one departure from normal do not cancel
    each other (their correlation was positive on the test normals of every measured run,
    docs/measurements.md), so the spread is taken as at least the uncorrelated one. `either`, the
    larger of the two, spreads about as the wider of them: that one's spread is its floor.
    """
    spreads = [float(np.std(normal[name], ddof=1)) / fusion[name][1] for name in normal]
    return max(spreads) if score == "either" else math.sqrt(sum(s ** 2 for s in spreads))


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return mean, max(std, 0.05 * abs(mean), 1e-6)  # floor: with k = 1..3 the spread is barely known
