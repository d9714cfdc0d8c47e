"""The label store: append-only entries, the latest word on an image wins, nothing lost to a
concurrent writer or a corrupt entry, nothing written for a refused image."""

import io
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from flows.cli.main import main as cli_main
from flows.store.labels import (
    AUDIT,
    DEFECT,
    GOOD,
    HIGHEST_SCORE,
    NEAR_THRESHOLD,
    RETRACTED,
    LabelError,
    LabelSnapshot,
    add_labels,
    current_labels,
    label_history,
    labels_prefix,
)
from flows.store.storage import LocalStore
from fsad_core.evidence import in_hash_share

P = "washer"


def png(seed: int, side: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def test_the_latest_word_on_an_image_wins_a_retraction_withdraws_it_and_the_history_stays(store):
    a, b = png(1), png(2)
    add_labels(store, P, [("a.png", a), ("b.png", b)], GOOD, "ann", "audit")
    [defect] = add_labels(store, P, [("line/7/a.png", a)], DEFECT, "bob", "near the threshold", "scratch")
    labels = current_labels(store, P)
    assert {e.source: (e.label, e.by, e.defect_type) for e in labels.values()} == {
        "line/7/a.png": (DEFECT, "bob", "scratch"), "b.png": (GOOD, "ann", "")}
    assert store.get_bytes(defect.image_key) == a and defect.image_key.endswith(f"{defect.image_sha256}.png")
    assert len(store.list(labels_prefix(P) + "images/")) == 2  # one copy of each content
    add_labels(store, P, [("a.png", a)], RETRACTED, "bob", "undo")
    assert [e.source for e in current_labels(store, P).values()] == ["b.png"]
    assert [e.label for e in label_history(store, P)] == [GOOD, GOOD, DEFECT, RETRACTED]


def test_labellers_writing_at_once_lose_nothing(store):
    def label(worker: int) -> None:
        for i in range(5):
            add_labels(store, P, [(f"{worker}-{i}.png", png(100 * worker + i))], GOOD, f"op{worker}", "audit")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(label, range(8)))
    assert len(current_labels(store, P)) == 40 and len(label_history(store, P)) == 40


def test_a_corrupt_entry_is_skipped_with_a_warning_and_costs_no_other(store, caplog):
    add_labels(store, P, [("a.png", png(1))], GOOD, "ann", "audit")
    store.put_bytes(labels_prefix(P) + "entries/00000000T000000.000000Z-bad.json", b'{"label": "good"')
    store.put_bytes(labels_prefix(P) + "entries/00000000T000000.000001Z-odd.json", b'{"label": "maybe"}')
    add_labels(store, P, [("b.png", png(2))], DEFECT, "ann", "audit")
    with caplog.at_level(logging.WARNING):
        labels = current_labels(store, P)
    assert sorted(e.source for e in labels.values()) == ["a.png", "b.png"]
    assert sum("not a label entry" in r.message for r in caplog.records) == 2


@pytest.mark.parametrize("images, label, by, defect_type, reason", [
    ([("a.png", png(1)), ("broken.png", b"not an image")], GOOD, "ann", "", "broken.png: not a recognised image"),
    ([("a.png", png(1))], "maybe", "ann", "", "label 'maybe'"),
    ([("a.png", png(1))], GOOD, "ann", "scratch", "a defect type goes with a defect label only"),
    ([("a.png", png(1))], GOOD, " ", "", "labeller ' '"),
    ([("thin.png", png(1, side=8))], DEFECT, "ann", "", "thin.png: refused"),
])
def test_a_refused_image_or_field_writes_nothing(store, images, label, by, defect_type, reason):
    with pytest.raises(LabelError, match=reason):
        add_labels(store, P, images, label, by, "audit", defect_type)
    assert store.list(labels_prefix(P)) == []


def test_fsad_label_labels_files_and_store_keys_and_names_what_it_refuses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FSAD_STORAGE", str(tmp_path / "store"))
    (tmp_path / "a.png").write_bytes(png(1))
    LocalStore(tmp_path / "store").put_bytes("line/day1/b.png", png(2))
    assert cli_main(["label", "--product", P, "--defect", "--type", "dent", "--by", "ann",
                     str(tmp_path / "a.png"), "line/day1/b.png"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{P}: 0 good and 2 defect images labelled"
    assert cli_main(["label", "--product", P, "--retract", str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{P}: 0 good and 1 defect images labelled"
    assert cli_main(["label", "--product", P, "--good", str(tmp_path / "missing.png")]) == 1
    assert "missing.png: neither a file nor an object of" in capsys.readouterr().err
    assert cli_main(["label", "--product", "../x", "--good", str(tmp_path / "a.png")]) == 1


def test_fsad_label_of_a_queued_image_keeps_its_queue_reason_and_weight(tmp_path, monkeypatch):
    from flows.store.queue import QueueItem, write_queue

    monkeypatch.setenv("FSAD_STORAGE", str(tmp_path / "store"))
    for name in ("queued.png", "other.png"):
        (tmp_path / name).write_bytes(png(len(name)))
    queued = str(tmp_path / "queued.png")
    write_queue(LocalStore(tmp_path / "store"), P, [QueueItem(queued, 0.45, 0.5, False, "3", NEAR_THRESHOLD, 6.0)])
    assert cli_main(["label", "--product", P, "--good", queued, str(tmp_path / "other.png")]) == 0
    entries = {e.source: e for e in current_labels(LocalStore(tmp_path / "store"), P).values()}
    assert (entries[queued].reason, entries[queued].weight) == (NEAR_THRESHOLD, 6.0)
    assert (entries[str(tmp_path / "other.png")].reason, entries[str(tmp_path / "other.png")].weight) == (
        "command line", 0.0)


def test_a_share_of_the_labels_judges_by_hash_with_its_weight_and_unweighted_picks_by_score_never(store):
    reasons = (AUDIT, NEAR_THRESHOLD, HIGHEST_SCORE, "command line")
    for i in range(80):  # a queue's labels carry weights; labels of older queues, by score, none
        weight = 0.0 if i % 8 in (1, 2) or i % 4 == 3 else 2.0 + i % 4
        add_labels(store, P, [(f"{i}.png", png(i))], GOOD, "ann", reasons[i % 4],
                   drawn={f"{i}.png": (reasons[i % 4], weight)} if weight else None)
    labels = current_labels(store, P).values()
    judging, training = LabelSnapshot.of(current_labels(store, P)).split(0.5)
    eligible = [e for e in labels if e.weight > 0 or e.reason in (AUDIT, "command line")]
    assert sorted(e.image_sha256 for e in judging) == sorted(
        e.image_sha256 for e in eligible if in_hash_share(e.image_sha256, 0.5))
    assert 0 < len(judging) < len(eligible) and not {e.image_sha256 for e in judging} & {
        e.image_sha256 for e in training}
    assert {e.judging_weight for e in judging} <= {1.0, 2.0, 3.0, 4.0}
    assert all(e.judging_weight == 1.0 for e in judging if e.reason == "command line")
    assert all(e.judging_weight is None for e in labels if e.weight == 0 and e.reason in (NEAR_THRESHOLD,
                                                                                            HIGHEST_SCORE))


def test_a_weight_that_is_not_a_number_of_0_or_more_is_refused_or_skipped(store, caplog):
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(LabelError, match="weight"):
            add_labels(store, P, [("a.png", png(1))], GOOD, "ann", AUDIT, drawn={"a.png": (AUDIT, bad)})
    [entry] = add_labels(store, P, [("a.png", png(1))], GOOD, "ann", AUDIT, drawn={"a.png": (AUDIT, 16.0)})
    assert current_labels(store, P)[entry.image_sha256].weight == 16.0
    forged = entry.to_json().replace('"weight": 16.0', '"weight": "many"')
    store.put_bytes(f"products/{P}/labels/entries/20990101T000000.000000Z-forged.json", forged.encode())
    assert current_labels(store, P)[entry.image_sha256].weight == 16.0 and "not a label entry" in caplog.text


def test_a_reader_that_keeps_what_it_read_reads_each_entry_once_and_sees_new_ones(store, monkeypatch):
    add_labels(store, P, [("a.png", png(1)), ("b.png", png(2))], GOOD, "ann", "audit")
    reads = []
    real = type(store).get_bytes
    monkeypatch.setattr(type(store), "get_bytes", lambda self, key: reads.append(key) or real(self, key))
    known: dict = {}
    assert len(current_labels(store, P, known)) == 2 and len(reads) == 2
    add_labels(store, P, [("a.png", png(1))], RETRACTED, "ann", "audit")
    assert len(current_labels(store, P, known)) == 1 and len(reads) == 3  # only the new entry was read
