"""How much a benchmark can be believed: the AUROC of labelled images with a bootstrap interval and
the counts behind it, and whether it is labelled evidence at all.

A benchmark of few images says little, and the gate must know how little: the interval comes from
resampling the normal and the defective images apart (each resample keeps both classes). Images
may carry weights, the inverse of the chance they had to be picked for labelling, so that a
benchmark of picked images estimates the AUROC of the line's own mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import erfinv

LABELLED, SYNTHETIC = "labelled", "synthetic"
MIN_PER_CLASS = 5  # labelled evidence needs at least this many defects and this many normals
INTERVAL_LEVEL = 0.9
RESAMPLES = 2000
# A candidate of another method replaces a champion when its AUROC is above the champion's in at
# least this share of the paired resamples of their common benchmark: credibly better, not better
# by the luck of a few images. The same share tells two candidates apart (`best_candidate`).
PROMOTION_CONFIDENCE = 0.9
# The champion's own method trained again, on more labels, replaces it when it is at least as likely
# above it as below: a change of method needs evidence, more of the product's images the absence of
# evidence against them.
RETRAINING_CONFIDENCE = 0.5


@dataclass(frozen=True)
class Evidence:
    """A benchmark's verdict on one model: its AUROC, the interval, and what it stands on."""

    kind: str  # LABELLED or SYNTHETIC
    auroc: float
    low: float
    high: float
    n_normal: int
    n_defect: int
    resampled: np.ndarray | None = field(default=None, compare=False, repr=False)  # the bootstrap's AUROCs
    missed: float | None = None  # share of the defects (by weight) the model lets pass at its threshold

    def share_above(self, other: Evidence) -> float:
        """Of the paired resamples, the share in which this AUROC is above the other's, a tie counting
        half. `judge` draws the same resamples for every model judged on one benchmark (the same
        images, in the same order, with the same seed), so the two differ only by the models' scores."""
        if self.resampled is None or other.resampled is None or len(self.resampled) != len(other.resampled):
            raise ValueError("paired resamples of one benchmark are needed to compare two models")
        return float(np.mean(self.resampled > other.resampled) + 0.5 * np.mean(self.resampled == other.resampled))

    def misses_more(self, other: Evidence) -> bool:
        """Whether this model lets more of the benchmark's defects pass at its threshold than the
        other at its own: another method brings another threshold, which a better AUROC says
        nothing of. False where either did not say what it decided (and on a difference of rounding)."""
        return self.missed is not None and other.missed is not None and self.missed > other.missed + 1e-9


def evidence_kind(n_normal: int, n_defect: int) -> str:
    return LABELLED if min(n_normal, n_defect) >= MIN_PER_CLASS else SYNTHETIC


@dataclass(frozen=True)
class _Pairs:
    """Every defect against every normal: 1 where the defect scores higher, 0.5 on a tie; with the
    weights of the defects and of the normals."""

    wins: np.ndarray  # defects x normals
    defect_weights: np.ndarray
    normal_weights: np.ndarray

    @classmethod
    def of(cls, labels: Sequence[int], scores: Sequence[float], weights: Sequence[float] | None) -> _Pairs:
        y, s = np.asarray(labels), np.asarray(scores, dtype=np.float64)
        w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
        if not (y == 1).any() or not (y == 0).any():
            raise ValueError("the AUROC needs both normal and defective images")
        defects, normals = s[y == 1], s[y == 0]
        wins = (defects[:, None] > normals[None, :]) + 0.5 * (defects[:, None] == normals[None, :])
        return cls(wins, w[y == 1], w[y == 0])

    def auroc(self) -> float:
        wd, wn = self.defect_weights, self.normal_weights
        return float(wd @ self.wins @ wn / (wd.sum() * wn.sum()))


def weighted_auroc(labels: Sequence[int], scores: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """The AUROC with each image counted by its weight: the chance that a defect drawn by weight
    scores above a normal drawn by weight."""
    return _Pairs.of(labels, scores, weights).auroc()


def effective_count(weights: np.ndarray) -> float:
    """(sum w)^2 / sum w^2: as many equally weighted images as the weighted ones are worth (Kish);
    the count itself when the weights are equal."""
    return float(weights.sum() ** 2 / (weights ** 2).sum())


def wilson_interval(share: float, count: float) -> tuple[float, float]:
    """Wilson's `INTERVAL_LEVEL` interval of a share seen in ``count`` trials: it stays inside
    [0, 1] and is honest for few trials and shares near 0 or 1."""
    z = float(np.sqrt(2) * erfinv(INTERVAL_LEVEL))
    centre = (share * count + z * z / 2) / (count + z * z)
    half = z * np.sqrt(share * (1 - share) * count + z * z / 4) / (count + z * z)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def judge(labels: Sequence[int], scores: Sequence[float], weights: Sequence[float] | None = None,
          kind: str | None = None, seed: int = 0, flagged: Sequence[bool] | None = None) -> Evidence:
    """The benchmark's AUROC with its `INTERVAL_LEVEL` interval: the bootstrap's, widened to the
    distribution-free one. An AUROC's variance is at most A(1 - A) / min(defects, normals) whatever
    the scores (Birnbaum and Klose), so Wilson's interval at that count, on the weights' effective
    counts, holds where resampling a few weighted images cannot show the hard defects the draws
    missed (docs/loop.md). ``kind`` defaults to what the counts allow (`evidence_kind`); with the
    model's decisions (``flagged``), the share of the defects it misses."""
    pairs = _Pairs.of(labels, scores, weights)
    auroc = pairs.auroc()
    wins, wd, wn = pairs.wins, pairs.defect_weights, pairs.normal_weights
    rng = np.random.default_rng(seed)
    draws_d = rng.multinomial(len(wd), np.full(len(wd), 1 / len(wd)), size=RESAMPLES) * wd
    draws_n = rng.multinomial(len(wn), np.full(len(wn), 1 / len(wn)), size=RESAMPLES) * wn
    resampled = np.einsum("bi,ij,bj->b", draws_d, wins, draws_n) / (draws_d.sum(1) * draws_n.sum(1))
    tail = (1 - INTERVAL_LEVEL) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    bound_low, bound_high = wilson_interval(auroc, min(effective_count(wd), effective_count(wn)))
    low, high = min(low, bound_low), max(high, bound_high)
    n_normal, n_defect = len(wn), len(wd)
    missed = None if flagged is None else float(wd @ ~np.asarray(flagged, bool)[np.asarray(labels) == 1] / wd.sum())
    return Evidence(kind or evidence_kind(n_normal, n_defect), auroc, float(low), float(high), n_normal, n_defect,
                    resampled, missed)


def in_hash_share(sha256: str, share: float) -> bool:
    """Whether a hash falls in the first ``share`` of the hash range: a choice by chance that every
    process and machine makes alike, and no one's judgement decides. By an image's content hash, a
    label that judges (it never changes sides as labels come and go); by its address, an audit."""
    return int(sha256[:8], 16) / 2**32 < share


def best_candidate(evidence: dict[str, Evidence], seconds: dict[str, float], day0: str,
                   incumbent: str | None = None, champion: Evidence | None = None) -> tuple[str, str]:
    """The candidate method to register, and why. ``incumbent``: the method whose candidate is the
    champion trained again; ``champion``: the champion's evidence on the same benchmark. On
    labelled evidence, the best AUROC of the candidates the gate could take (all, where none could):
    the incumbent, and those that let no more of the benchmark's defects pass than the champion; of
    those the benchmark cannot tell from the best (the best is above them in fewer than
    `PROMOTION_CONFIDENCE` of the paired resamples), the incumbent where it is one of them (a change
    of method needs evidence, and the gate asks for it), else the cheapest (fewest seconds).
    Without labelled evidence, the day-0 rule ``day0``."""
    if len(evidence) == 1:
        return next(iter(evidence)), "the only candidate"
    shown = ", ".join(f"{name} {e.auroc:.4f} ({e.low:.3f}-{e.high:.3f})" for name, e in evidence.items())
    if any(e.kind != LABELLED for e in evidence.values()):
        chosen = day0 if day0 in evidence else next(iter(evidence))
        return chosen, f"{chosen}: no labelled evidence, the day-0 rule (candidates {shown})"
    allowed = [name for name in evidence
               if name == incumbent or champion is None or not evidence[name].misses_more(champion)] or list(evidence)
    best = max(allowed, key=lambda name: evidence[name].auroc)
    tied = [name for name in allowed
            if name == best or evidence[best].share_above(evidence[name]) < PROMOTION_CONFIDENCE]
    chosen = incumbent if incumbent in tied else min(tied, key=seconds.__getitem__)
    if chosen == best:
        why = "the best on the labelled benchmark"
    elif chosen == incumbent:
        why = f"the champion's method, which the benchmark cannot tell from the best ({best})"
    else:
        why = f"the cheapest of those the labelled benchmark cannot tell from the best ({best})"
    passing = "" if len(allowed) == len(evidence) else \
        f"; {', '.join(sorted(set(evidence) - set(allowed)))} let more defects pass than the champion"
    return chosen, f"{chosen}: {why} (candidates {shown}{passing})"
