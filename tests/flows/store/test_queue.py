"""The review queue: picks by score leave out what is labelled, the audit is chance alone and keeps
its record, and the escape estimate comes from the audits the model passed."""

import io

import numpy as np
import pytest
from PIL import Image

from flows.store.labels import AUDIT, DEFECT, GOOD, HIGHEST_SCORE, NEAR_THRESHOLD, LabelEntry, add_labels
from flows.store.queue import (
    Decided,
    QueueItem,
    audited,
    escape_estimate,
    pick,
    queue_state,
    read_queue,
    write_queue,
)
from flows.store.storage import LocalStore


def _decided(n: int, threshold: float = 5.0) -> list[Decided]:
    return [Decided(f"line/{i:04d}.png", float(i % 10), threshold, i % 10 > threshold, "3") for i in range(n)]


def test_picks_by_score_are_nearest_the_threshold_then_highest_and_leave_out_labelled_images():
    decided = _decided(200)
    labelled = {d.image for d in decided if d.score == 5.0}  # everything at the threshold is labelled
    items = pick(decided, labelled, size=8)
    by_score = [i for i in items if i.reason != AUDIT]
    assert [i.reason for i in by_score] == [NEAR_THRESHOLD] * 4 + [HIGHEST_SCORE] * 4
    assert all(abs(i.score - 5.0) == 1.0 for i in by_score[:4]) and all(i.score == 9.0 for i in by_score[4:])
    assert not {i.image for i in by_score} & labelled and all(i.weight == 0.0 for i in by_score)


def test_the_audit_is_chance_alone_and_keeps_labelled_images_on_record():
    decided = _decided(4000)
    audits = [i for i in pick(decided, {d.image for d in decided}, rate=0.05) if i.reason == AUDIT]
    assert 0.04 < len(audits) / 4000 < 0.06 and all(i.weight == pytest.approx(20.0) for i in audits)
    shares = [np.mean([i.score == s for i in audits]) for s in range(10)]
    assert max(shares) < 0.2  # every score alike: the audit never looks at the score
    assert all(audited(i.image, 0.05) for i in audits)


def test_the_stored_queue_leaves_out_what_is_labelled_since(tmp_path):
    store = LocalStore(tmp_path)
    items = pick(_decided(50), set(), size=6)
    write_queue(store, "washer", items)
    assert read_queue(store, "washer") == items
    add_labels(store, "washer", [(items[0].image, _png())], GOOD, "ann", items[0].reason)
    state = queue_state(store, "washer")
    assert state.items == items[1:] and state.counts == {GOOD: 1, DEFECT: 0}
    assert read_queue(store, "washer") == items  # the stored queue keeps it: an audit stays on record
    assert read_queue(store, "other") == []


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _label(image: str, label: str) -> LabelEntry:
    return LabelEntry("0" * 64, "k", label, "ann", "20260101T000000.000000Z", AUDIT, image)


def test_the_escape_estimate_counts_defects_among_the_audited_images_the_model_passed():
    queue = [QueueItem(f"a{i}", 1.0, 5.0, False, "3", AUDIT, 20.0) for i in range(40)] + \
        [QueueItem("flagged", 9.0, 5.0, True, "3", AUDIT, 20.0), QueueItem("near", 4.9, 5.0, False, "3",
                                                                          NEAR_THRESHOLD, 0.0)]
    labels = [_label(f"a{i}", DEFECT if i < 2 else GOOD) for i in range(40)] + \
        [_label("flagged", DEFECT), _label("near", DEFECT)]
    estimate = escape_estimate(labels, queue)
    assert (estimate.passed_audited, estimate.defects, estimate.rate) == (40, 2, 0.05)
    assert 0 < estimate.low < 0.05 < estimate.high < 0.2
    assert escape_estimate(labels[:0], queue) is None
