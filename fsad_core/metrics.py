"""Evaluation metrics: image AUROC (over all defects and per defect type), pixel AUROC, AUPRO and
rates at a threshold.

Conventions used everywhere in fsad: higher score = more anomalous; label 1 = defect; an
image (or pixel) is flagged as an anomaly when ``score > threshold`` (strictly greater), so a
threshold equal to a score does not flag it. Metrics that are undefined for the given data
(one class only, no defect region) return None instead of a misleading number, and
non-finite scores raise: an AUROC over NaN scores would silently be meaningless.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import confusion_matrix, roc_auc_score

MAX_PIXELS = 5_000_000
"""Pixel budget of the pixel metrics; above it pixels are subsampled (see `_subsample`)."""

_SUBSAMPLE_SEED = 0
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)  # as the MVTec AD reference implementation


def as_finite_scores(values: Iterable[float] | np.ndarray, name: str = "scores") -> np.ndarray:
    """1-D float64 copy of ``values``; ValueError when empty or not all finite."""
    scores = np.asarray(values, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError(f"{name} is empty")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"{name} contains {int(bad.sum())} non-finite value(s) (NaN/inf) out of {scores.size}; "
                         "refusing to compute a metric or threshold over them")
    return scores


def as_labels(labels: Iterable[int] | np.ndarray, n: int) -> np.ndarray:
    """0/1 int labels of length n (1 = defect)."""
    y = np.asarray(labels).ravel()
    if y.size != n:
        raise ValueError(f"labels has {y.size} entries but scores has {n}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (defect)")
    return y.astype(np.int64)


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Image-level AUROC; None when only one class is present."""
    s = as_finite_scores(scores)
    y = as_labels(labels, s.size)
    if np.unique(y).size < 2:
        return None
    return float(roc_auc_score(y, s))


def defect_type_aurocs(labels: Sequence[int] | np.ndarray, defect_types: Sequence[str],
                       scores: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Image AUROC of each defect type against all normal images: which kinds of defect a model
    misses, which one AUROC over all defects hides. Empty when there are no normal images."""
    s = as_finite_scores(scores)
    y = as_labels(labels, s.size)
    types = np.asarray(defect_types, dtype=object)
    if types.size != s.size:
        raise ValueError(f"{types.size} defect types for {s.size} scores")
    normal = y == 0
    if not normal.any():
        return {}
    out = {}
    for name in sorted(set(types[~normal])):
        keep = normal | (types == name)
        out[str(name)] = float(roc_auc_score(y[keep], s[keep]))
    return out


def _flatten_pixels(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                    label_regions: bool) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated pixel scores and per-pixel labels, without resizing.

    With ``label_regions`` the labels are global connected-component ids (0 = normal pixel,
    8-connectivity, numbered across all images); otherwise 0/1 defect labels.
    """
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} maps")
    if len(maps) == 0:
        raise ValueError("no maps given")
    labels, scores, offset = [], [], 0
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        mask, amap = np.asarray(mask), np.asarray(amap)
        if mask.ndim != 2 or mask.shape != amap.shape:
            raise ValueError(f"image {i}: mask {mask.shape} and map {amap.shape} must be the same HxW shape")
        defect = mask != 0
        if label_regions:
            regions, n = ndimage.label(defect, structure=_EIGHT_CONNECTED)
            regions = regions.astype(np.int64)
            regions[defect] += offset
            offset += n
            labels.append(regions.ravel())
        else:
            labels.append(defect.ravel())
        scores.append(amap.ravel())
    return np.concatenate(labels), as_finite_scores(np.concatenate(scores), "maps")


def _subsample(positive: np.ndarray, max_pixels: int) -> np.ndarray | None:
    """Indices of a deterministic, class-stratified subsample, or None when all pixels fit.

    Positives (defect pixels) get the budget left by the negatives but at least half of it, so
    all of them are kept unless they alone exceed half the budget; negatives fill the rest.
    Each class is sampled uniformly without replacement with a fixed seed. Uniform sampling
    within a class leaves AUROC and per-region overlap / FPR curves unbiased.
    """
    if positive.size <= max_pixels:
        return None
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    n_pos = min(pos.size, max(max_pixels - neg.size, max_pixels // 2))
    n_neg = min(neg.size, max_pixels - n_pos)
    rng = np.random.default_rng(_SUBSAMPLE_SEED)
    keep = [rng.choice(pos, n_pos, replace=False) if n_pos < pos.size else pos,
            rng.choice(neg, n_neg, replace=False) if n_neg < neg.size else neg]
    return np.sort(np.concatenate(keep))


def pixel_auroc(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                max_pixels: int = MAX_PIXELS) -> float | None:
    """Pixel-level AUROC over all pixels of all images (flattened, never resized).

    Above ``max_pixels`` pixels a deterministic stratified subsample is used (`_subsample`).
    None when all pixels are of one class.
    """
    defect, scores = _flatten_pixels(masks, maps, label_regions=False)
    keep = _subsample(defect, max_pixels)
    if keep is not None:
        defect, scores = defect[keep], scores[keep]
    if defect.all() or not defect.any():
        return None
    return float(roc_auc_score(defect, scores))


def aupro(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], max_fpr: float = 0.3,
          max_pixels: int = MAX_PIXELS) -> float | None:
    """Area under the per-region-overlap curve up to ``max_fpr``, normalised to [0, 1] (MVTec AD).

    Each connected component (8-connectivity) of each ground-truth mask is a region; PRO at a
    threshold is the mean over all regions of the fraction of the region flagged, FPR is the
    fraction of normal pixels flagged (all pixels outside regions, of every image). The curve is
    computed in one sort over all pixel scores (one point per distinct score), cut at
    ``max_fpr`` with linear interpolation, integrated by the trapezoid rule and divided by
    ``max_fpr``. Masks without defect pixels add no region. Above ``max_pixels`` pixels the
    same stratified subsample as `pixel_auroc` is used, regions being weighted by their kept
    pixel counts. None when there is no region or no normal pixel.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    regions, scores = _flatten_pixels(masks, maps, label_regions=True)
    keep = _subsample(regions > 0, max_pixels)
    if keep is not None:
        regions, scores = regions[keep], scores[keep]
    normal = regions == 0
    if normal.all() or not normal.any():
        return None

    sizes = np.bincount(regions)
    n_regions = np.count_nonzero(sizes[1:])
    weights = np.where(normal, 0.0, 1.0 / (n_regions * sizes[regions]))

    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    fpr = np.cumsum(normal[order]) / np.count_nonzero(normal)
    pro = np.cumsum(weights[order])
    last_of_ties = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr = np.concatenate(([0.0], fpr[last_of_ties]))
    pro = np.concatenate(([0.0], pro[last_of_ties]))

    stop = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:stop], pro[:stop]
    if x[-1] < max_fpr:  # the curve reaches fpr = 1 >= max_fpr, so fpr[stop] exists
        x0, x1, y0, y1 = fpr[stop - 1], fpr[stop], pro[stop - 1], pro[stop]
        x = np.append(x, max_fpr)
        y = np.append(y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0))
    return float(np.trapezoid(y, x) / max_fpr)


def rates_at_threshold(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                       threshold: float) -> dict[str, float | int | None]:
    """Counts and rates when flagging ``score > threshold`` (strictly greater).

    Keys: ``tp, fp, tn, fn, n_normal, n_defect`` and ``precision, recall, f1, false_alarm_rate``
    (FPR on normals), ``miss_rate`` (FNR on defects). A rate whose denominator is zero is None
    (e.g. no defects: recall and miss_rate; nothing flagged: precision).
    """
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    s = as_finite_scores(scores)
    y = as_labels(labels, s.size)
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(y, s > threshold, labels=[0, 1]).ravel())

    def ratio(num: int, den: int) -> float | None:
        return num / den if den else None

    return {
        "threshold": float(threshold),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "n_normal": tn + fp, "n_defect": tp + fn,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "false_alarm_rate": ratio(fp, tn + fp),
        "miss_rate": ratio(fn, tp + fn),
    }


def summarize(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1; 0.0 for one value) ignoring None; (None, None) if nothing left."""
    kept = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if kept.size == 0:
        return None, None
    std = float(kept.std(ddof=1)) if kept.size > 1 else 0.0
    return float(kept.mean()), std


def lowest_threshold_within(normal_scores: np.ndarray, rate: float) -> float:
    """The lowest threshold that flags (``score > threshold``) at most `rate` of these normal
    scores: the (floor(n * rate) + 1)-th largest of them."""
    ranked = np.sort(normal_scores)[::-1]
    return float(ranked[min(math.floor(rate * ranked.size), ranked.size - 1)])


def miss_rate_at_false_alarm_rate(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                                  rate: float) -> float | None:
    """The share of defects missed by the threshold that flags at most `rate` of the normal images
    and no threshold lower: the fewest misses any threshold allows at that false-alarm rate, which
    tells a calibrated threshold's misses due to the ranking from those due to its margin."""
    s = as_finite_scores(scores)
    y = as_labels(labels, s.size)
    normal, defect = s[y == 0], s[y == 1]
    if not normal.size or not defect.size:
        return None
    return float(np.mean(defect <= lowest_threshold_within(normal, rate)))
