"""The review queue: each run's new decisions drawn in strata with known chances, so that the
labelled images, weighted, stand for the line; the stored queue keeps the record and leaves out
what is labelled; the escape estimate weighs the drawn images the model passed."""

import io

import numpy as np
import pytest
from PIL import Image

from flows.store.labels import AUDIT, DEFECT, GOOD, HIGHEST_SCORE, NEAR_THRESHOLD, LabelEntry, add_labels
from flows.store.queue import (
    Decided,
    QueueItem,
    allocation,
    draw,
    drawn,
    escape_estimate,
    pick,
    queue_state,
    read_queue,
    strata,
    write_queue,
)
from flows.store.storage import LocalStore
from fsad_core.evidence import judge, weighted_auroc


def _decided(n: int, threshold: float = 0.5, run: str = "day-1") -> list[Decided]:
    scores = np.random.default_rng(n).uniform(0, 1, n)
    return [Decided(f"line/{run}/{i:04d}.png", float(s), threshold, bool(s > threshold), "3")
            for i, s in enumerate(scores)]


def test_a_run_is_drawn_in_three_strata_with_the_budget_shared_and_each_image_weighted_by_its_chance():
    decided = _decided(60)
    groups = strata(decided)
    assert [len(groups[r]) for r in (HIGHEST_SCORE, NEAR_THRESHOLD, AUDIT)] == [6, 6, 48]
    assert min(d.score for d in groups[HIGHEST_SCORE]) >= max(d.score for d in groups[NEAR_THRESHOLD] + groups[AUDIT])
    near = max(abs(d.score - 0.5) for d in groups[NEAR_THRESHOLD])
    assert all(abs(d.score - 0.5) >= near for d in groups[AUDIT])
    items = pick(decided, 12)
    counts = {r: sum(i.reason == r for i in items) for r in (HIGHEST_SCORE, NEAR_THRESHOLD, AUDIT)}
    assert counts == {HIGHEST_SCORE: 5, NEAR_THRESHOLD: 4, AUDIT: 3}
    assert {i.reason: i.weight for i in items} == {HIGHEST_SCORE: 6 / 5, NEAR_THRESHOLD: 6 / 4, AUDIT: 48 / 3}
    assert [draw(i.image) for i in items] == sorted(draw(i.image) for i in items)  # shown in the draw's order
    audit = sorted(groups[AUDIT], key=lambda d: draw(d.image))[:3]  # chance alone: the hash, not the score
    assert {i.image for i in items if i.reason == AUDIT} == {d.image for d in audit}


def test_a_small_run_or_a_small_stratum_gives_its_share_to_the_others():
    assert allocation({HIGHEST_SCORE: 1, NEAR_THRESHOLD: 1, AUDIT: 8}, 12) == {HIGHEST_SCORE: 1, NEAR_THRESHOLD: 1,
                                                                                AUDIT: 8}
    assert allocation({HIGHEST_SCORE: 10, NEAR_THRESHOLD: 10, AUDIT: 1}, 12) == {HIGHEST_SCORE: 7, NEAR_THRESHOLD: 4,
                                                                                  AUDIT: 1}
    items = pick(_decided(8), 24)
    assert len(items) == 8 and all(i.weight == 1.0 for i in items)


def test_the_weighted_labels_of_the_draws_estimate_the_lines_auroc_where_the_unweighted_do_not():
    """A line whose model ranks defects above normals with AUROC about 0.8, 10 % defects, drawn for
    many runs: the draws over-represent high scores (most defects, the highest normals)."""
    rng = np.random.default_rng(0)
    population, drawn = [], []
    for run in range(300):
        labels = rng.random(60) < 0.1
        scores = rng.normal(0, 1, 60) + 1.2 * labels
        decided = [Decided(f"r{run}/{i}.png", float(s), 1.5, bool(s > 1.5), "3") for i, s in enumerate(scores)]
        truth = {d.image: int(y) for d, y in zip(decided, labels)}
        population += [(truth[d.image], d.score) for d in decided]
        drawn += [(truth[i.image], i.score, i.weight) for i in pick(decided, 12)]
    y, s = np.array([p[0] for p in population]), np.array([p[1] for p in population])
    line = weighted_auroc(y, s)
    dy, ds, dw = (np.array([d[j] for d in drawn]) for j in range(3))
    assert abs(weighted_auroc(dy, ds, dw) - line) < 0.02
    assert abs(weighted_auroc(dy, ds) - line) > 0.04  # the same draws, unweighted, are far off


def test_the_interval_of_a_few_days_of_draws_covers_the_lines_auroc():
    """Five runs of 60 parts, 12 drawn a run: the hard defects (low scores) come with large weights
    and are often not drawn at all, so the bootstrap of the draws alone reads high and narrow."""
    rng = np.random.default_rng(1)
    line = 0.802  # Phi(1.2 / sqrt 2): a defect 1.2 sd above a normal
    covered, bootstrap_covered = [], []
    for replay in range(80):
        drawn = []
        for run in range(5):
            labels = rng.random(60) < 0.1
            scores = rng.normal(0, 1, 60) + 1.2 * labels
            decided = [Decided(f"{replay}/{run}/{i}", float(s), 1.5, bool(s > 1.5), "3") for i, s in enumerate(scores)]
            truth = {d.image: int(y) for d, y in zip(decided, labels)}
            drawn += [(truth[i.image], i.score, i.weight) for i in pick(decided, 12)]
        y = [d[0] for d in drawn]
        if min(sum(y), len(y) - sum(y)) < 5:
            continue
        e = judge(y, [d[1] for d in drawn], [d[2] for d in drawn])
        covered.append(e.low <= line <= e.high)
        bootstrap_covered.append(np.quantile(e.resampled, 0.05) <= line <= np.quantile(e.resampled, 0.95))
    assert len(covered) > 40 and np.mean(covered) >= 0.8 > np.mean(bootstrap_covered)


def test_the_stored_queue_leaves_out_what_is_labelled_since(tmp_path):
    store = LocalStore(tmp_path)
    items = pick(_decided(50), 6)
    write_queue(store, "washer", items)
    assert read_queue(store, "washer") == items
    add_labels(store, "washer", [(items[0].image, _png())], GOOD, "ann", items[0].reason, drawn=drawn(items[:1]))
    state = queue_state(store, "washer")
    assert state.items == items[1:] and state.counts == {GOOD: 1, DEFECT: 0}
    assert read_queue(store, "washer") == items  # the stored queue keeps it on record
    assert read_queue(store, "other") == []


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _label(image: str, label: str) -> LabelEntry:
    return LabelEntry("0" * 64, "k", label, "ann", "20260101T000000.000000Z", AUDIT, image)


def test_the_escape_estimate_weighs_the_labelled_drawn_images_the_model_passed():
    queue = [QueueItem(f"a{i}", 0.1, 0.5, False, "3", AUDIT, 16.0) for i in range(20)] + \
        [QueueItem(f"n{i}", 0.45, 0.5, False, "3", NEAR_THRESHOLD, 1.5) for i in range(10)] + \
        [QueueItem("flagged", 0.9, 0.5, True, "3", HIGHEST_SCORE, 1.2)]
    defects = {"a0", "n0", "n1", "n2", "flagged"}
    labels = [_label(i.image, DEFECT if i.image in defects else GOOD) for i in queue]
    estimate = escape_estimate(labels, queue)
    # (16 * 1 + 1.5 * 3) / (16 * 20 + 1.5 * 10): the audit's one defect stands for 16 passed parts
    assert (estimate.passed_labelled, estimate.defects) == (30, 4)
    assert estimate.rate == pytest.approx(20.5 / 335)
    assert 0 < estimate.low < estimate.rate < estimate.high < 0.3
    assert escape_estimate(labels[:0], queue) is None
    equal = [QueueItem(i.image, i.score, i.threshold, i.is_anomaly, i.version, i.reason, 1.0) for i in queue]
    assert escape_estimate(labels, equal).rate == pytest.approx(4 / 30)
