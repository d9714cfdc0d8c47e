"""The benchmark's evidence: AUROC with a bootstrap interval, weights for how images were picked,
the kind the counts allow, and the side of the split a content hash puts an image on."""

import hashlib
from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fsad_core.evidence import (
    LABELLED,
    SYNTHETIC,
    Evidence,
    best_candidate,
    effective_count,
    evidence_kind,
    in_hash_share,
    judge,
    weighted_auroc,
    wilson_interval,
)


def _scores(n_normal: int, n_defect: int, gap: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.array([0] * n_normal + [1] * n_defect)
    return labels, rng.normal(0, 1, len(labels)) + gap * labels


def test_unweighted_the_auroc_is_the_usual_one_ties_counting_half():
    labels, scores = _scores(20, 10, 1.0)
    scores[3] = scores[25]  # a tie between a normal and a defect
    assert weighted_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_weights_stand_for_how_images_were_picked():
    # One defect picked because it scored high stands for itself; nine easy defects were seen once
    # in ten (weight 10): weighted, the benchmark sees the line's mix, not the pick's.
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.0, 1.0, 2.0, 3.0, 2.5, 10.0])
    assert weighted_auroc(labels, scores) == pytest.approx((3 / 4 + 1) / 2)
    assert weighted_auroc(labels, scores, [1, 1, 1, 1, 1, 9]) == pytest.approx((3 / 4 + 9) / 10)
    with pytest.raises(ValueError, match="both normal and defective"):
        weighted_auroc([0, 0], [1.0, 2.0])


def test_the_share_of_defects_let_pass_counts_each_defect_by_its_weight():
    labels, scores = [0, 0, 1, 1, 1], [0.1, 0.9, 0.2, 0.8, 0.7]
    flagged = [s > 0.5 for s in scores]  # the defect at 0.2 passes
    assert judge(labels, scores, flagged=flagged).missed == pytest.approx(1 / 3)
    assert judge(labels, scores, [1, 1, 4, 1, 1], flagged=flagged).missed == pytest.approx(4 / 6)
    assert judge(labels, scores).missed is None


def test_the_interval_holds_the_auroc_and_narrows_with_more_images():
    small = judge(*_scores(6, 6, 1.0))
    large = judge(*_scores(120, 120, 1.0))
    for evidence in (small, large):
        assert evidence.low <= evidence.auroc <= evidence.high and evidence.kind == LABELLED
    assert large.high - large.low < (small.high - small.low) / 2
    assert (large.n_normal, large.n_defect) == (120, 120)


def test_the_interval_covers_the_truth_at_least_as_often_as_it_says():
    # 90 % intervals from benchmarks of 15 + 15 images drawn from one line: the AUROC of the line
    # (a gap of 1 sd: Phi(1 / sqrt 2) = 0.760) is inside in at least 90 % of them (the weighted
    # draws of a line, where the bootstrap alone fails: tests/flows/store/test_queue.py).
    judged = [judge(*_scores(15, 15, 1.0, seed)) for seed in range(200)]
    assert np.mean([e.low <= 0.760 <= e.high for e in judged]) >= 0.9
    e = judged[0]
    assert (e.low, e.high) == pytest.approx(wilson_interval(e.auroc, 15), abs=0.02)  # the bound at 15 a class


def test_wilson_interval_stays_inside_zero_and_one_and_narrows_with_the_count():
    assert wilson_interval(0.0, 5)[0] == 0.0 and 0 < wilson_interval(0.0, 5)[1] < 0.5
    assert wilson_interval(1.0, 5)[1] == 1.0
    assert np.diff(wilson_interval(0.8, 100)) < np.diff(wilson_interval(0.8, 10)) / 2
    assert effective_count(np.ones(7)) == pytest.approx(7) and effective_count(np.array([1.0, 1.0, 12.0])) < 2


def test_fewer_than_five_of_a_class_is_not_labelled_evidence():
    assert evidence_kind(5, 5) == LABELLED and evidence_kind(40, 4) == SYNTHETIC == evidence_kind(4, 40)
    assert judge(*_scores(8, 3, 2.0)).kind == SYNTHETIC


def test_an_image_stays_on_its_side_of_the_split_and_the_share_is_kept():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    sides = [in_hash_share(h, 0.3) for h in hashes]
    assert sides == [in_hash_share(h, 0.3) for h in hashes]
    assert 0.27 < np.mean(sides) < 0.33
    assert all(in_hash_share(h, 0.5) for h, side in zip(hashes, sides) if side)  # a larger share keeps them
    # The side is the hash's own, the same in every process and on every machine.
    assert in_hash_share("4ccccccc" + "0" * 56, 0.3) and not in_hash_share("4ccccccd" + "0" * 56, 0.3)


def _judged(separation: float, kind: str | None = None, own: int = 0) -> Evidence:
    """A model judged on one fixed benchmark of 20 normals and 8 defects (the same resamples for every
    model): its defects score ``separation`` above a shared draw, plus noise of its own (seed ``own``)."""
    labels = [0] * 20 + [1] * 8
    scores = np.random.default_rng(5).normal(0, 1, len(labels)) + separation * np.asarray(labels)
    return judge(labels, scores + np.random.default_rng(own).normal(0, 0.7, len(labels)), kind=kind)


def test_the_best_candidate_on_labelled_evidence_else_the_champions_method_or_the_cheaper_it_cannot_tell_apart():
    seconds = {"fast": 5.0, "default": 90.0}
    apart = {"fast": _judged(0.0), "default": _judged(3.0)}
    assert best_candidate(apart, seconds, "default")[0] == "default"
    assert best_candidate(apart, seconds, "default", incumbent="fast")[0] == "default"  # evidence decides
    close = {"fast": _judged(1.0, own=1), "default": _judged(1.1, own=2)}
    assert close["default"].auroc > close["fast"].auroc and close["default"].share_above(close["fast"]) < 0.9
    chosen, why = best_candidate(close, seconds, "default")
    assert chosen == "fast" and "cannot tell from the best (default)" in why
    chosen, why = best_candidate({"fast": close["default"], "default": close["fast"]}, seconds, "default",
                                 incumbent="default")
    assert chosen == "default" and "the champion's method, which the benchmark cannot tell from the best (fast)" in why
    chosen, why = best_candidate(close, seconds, "default", incumbent="default")  # the champion's method is the best
    assert chosen == "default" and "the best on the labelled benchmark" in why
    unlabelled = {"fast": _judged(3.0, SYNTHETIC), "default": _judged(0.0, SYNTHETIC)}
    assert best_candidate(unlabelled, seconds, "default", incumbent="fast")[0] == "default"
    assert best_candidate({"fast": apart["fast"]}, seconds, "default") == ("fast", "the only candidate")


def test_a_candidate_that_lets_more_defects_pass_than_the_champion_is_not_chosen_whatever_its_auroc():
    seconds = {"fast": 5.0, "default": 90.0}
    better, worse = _judged(3.0), _judged(0.0)
    assert better.share_above(worse) >= 0.9
    champion = replace(worse, missed=0.25)
    evidence = {"fast": replace(better, missed=0.5), "default": replace(worse, missed=0.4)}
    # the champion trained again is not held to the champion's misses (nor by the gate)
    chosen, why = best_candidate(evidence, seconds, "default", incumbent="default", champion=champion)
    assert chosen == "default" and "fast let more defects pass than the champion" in why
    # on a new upload no candidate is the champion trained again: the one the gate could take
    evidence["default"] = replace(worse, missed=0.25)
    assert best_candidate(evidence, seconds, "default", champion=champion)[0] == "default"
    evidence["default"] = replace(worse, missed=0.4)  # the gate could take none: the best AUROC, refused there
    assert best_candidate(evidence, seconds, "default", champion=champion)[0] == "fast"
    evidence["fast"] = replace(better, missed=0.25)  # as few pass as the champion's: the better AUROC decides
    assert best_candidate(evidence, seconds, "default", incumbent="default", champion=champion)[0] == "fast"


def test_two_models_judged_on_one_benchmark_are_compared_on_the_same_resamples():
    rng = np.random.default_rng(3)
    labels = [0] * 30 + [1] * 8
    weights = rng.uniform(1, 16, len(labels))
    weaker = np.concatenate([rng.normal(0, 1, 30), rng.normal(1.0, 1, 8)])
    stronger = weaker + 1.5 * np.asarray(labels)  # every defect scores higher, every normal the same
    a, b = judge(labels, stronger, weights), judge(labels, weaker, weights)
    assert a.auroc > b.auroc and a.share_above(b) >= 0.9 and b.share_above(a) < 0.01  # ties (both 1.0) count half
    assert a.share_above(judge(labels, stronger, weights)) == 0.5  # the same model: a tie, counted half
    with pytest.raises(ValueError, match="paired resamples"):
        a.share_above(Evidence(a.kind, a.auroc, a.low, a.high, a.n_normal, a.n_defect))
