"""What people said about a product's images: an append-only label store in the object store.

Each label is one object of its own (``products/P/labels/entries/TIME-RANDOM.json``), never
rewritten, so that two operators labelling at once never lose each other's work and the history
stays. An entry names its image by content hash; the image itself is copied once to
``products/P/labels/images/SHA256.EXT``, so a label outlives the line's prefixes. The latest entry
of an image wins; a retraction withdraws the image's label. An entry that cannot be read is
skipped with a warning and costs no other. An image is checked as an upload's images are (format,
bytes, pixels, shape) before anything is written.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from flows.store.records import append_record, checked_text, record_time
from flows.store.storage import PRODUCTS, ObjectNotFound, Store, open_store, validate_key, validate_name
from flows.store.upload import sha256_hex
from fsad_core.evidence import in_hash_share
from fsad_core.imageio import image_limits, read_image

GOOD, DEFECT, RETRACTED = "good", "defect", "retracted"
LABELS = (GOOD, DEFECT, RETRACTED)
# Why an image was looked at: the review queue's strata (`flows.store.queue`). A label of a queued
# image carries its weight; one without (labels of versions before the weights, by score) never judges.
NEAR_THRESHOLD, HIGHEST_SCORE, AUDIT = "near the threshold", "highest score", "audit"
PICKED_FOR_SCORE = (NEAR_THRESHOLD, HIGHEST_SCORE)
log = logging.getLogger(__name__)


class LabelError(ValueError):
    """A label that cannot be stored; the message names the image or the field."""


@dataclass(frozen=True)
class LabelEntry:
    """One statement about one image: its label, who gave it, when and why the image was looked at."""

    image_sha256: str
    image_key: str  # the store's copy of the image
    label: str  # GOOD, DEFECT or RETRACTED
    by: str
    at: str  # UTC, ISO 8601 to the microsecond: the order of entries
    reason: str  # why it was looked at: a queue's reason, "audit", "upload eval set", "command line"
    source: str  # where the image came from (a file name or a store key)
    defect_type: str = ""
    weight: float = 0.0  # the review queue's: one over the image's chance of a review; 0: no known chance

    @property
    def judging_weight(self) -> float | None:
        """What the image counts for when it judges: its queue weight, 1 for an image labelled
        outside the queue (no known chance: counted once), None for one picked for its score
        without a weight, which stands for the picks and never judges."""
        if self.weight > 0:
            return self.weight
        return None if self.reason in PICKED_FOR_SCORE else 1.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> LabelEntry:
        entry = cls(**json.loads(text))
        if entry.label not in LABELS or len(entry.image_sha256) != 64:
            raise ValueError(f"label {entry.label!r} of image {entry.image_sha256!r}")
        if isinstance(entry.weight, bool) or not isinstance(entry.weight, (int, float)) \
                or not (math.isfinite(entry.weight) and entry.weight >= 0):
            raise ValueError(f"weight {entry.weight!r} of image {entry.image_sha256!r}")
        return entry


def labels_prefix(product: str) -> str:
    return f"{PRODUCTS}/{validate_name(product, 'product name')}/labels/"


def _entries_prefix(product: str) -> str:
    return labels_prefix(product) + "entries/"


def default_labeller() -> str:
    """The OS user: who labels when no name is given."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def add_labels(store: Store, product: str, images: Iterable[tuple[str, bytes]], label: str, by: str, reason: str,
               defect_type: str = "", drawn: Mapping[str, tuple[str, float]] | None = None) -> list[LabelEntry]:
    """Label each (source name, bytes) image: every image is checked first, then each is copied
    into the product's label images (once per content) and its entry written; nothing is written
    when any image or field is refused. ``drawn`` gives the (reason, weight) of sources the review
    queue drew (`queue.drawn`), which they keep whatever ``reason`` says; the others get no weight."""
    if label not in LABELS:
        raise LabelError(f"label {label!r}: one of {', '.join(LABELS)}")
    if defect_type and label != DEFECT:
        raise LabelError("a defect type goes with a defect label only")
    by, reason = checked_text(by, "labeller", LabelError), checked_text(reason, "reason", LabelError)
    defect_type = checked_text(defect_type, "defect type", LabelError) if defect_type else ""
    drawn = drawn or {}
    if bad := [w for _, w in drawn.values() if not (math.isfinite(w) and w >= 0)]:
        raise LabelError(f"weight {bad[0]!r}: a finite number, 0 or more")
    checked = [(source, data, _image_key(product, source, data)) for source, data in images]
    entries = []
    for source, data, key in checked:
        if not store.exists(key):
            store.put_bytes(key, data)
        why, counts = drawn.get(source, (reason, 0.0))
        entry = LabelEntry(key.rsplit("/", 1)[1].split(".")[0], key, label, by, record_time(), why, source,
                           defect_type, float(counts))
        append_record(store, _entries_prefix(product), entry.at, entry.to_json())
        entries.append(entry)
    return entries


def _image_key(product: str, source: str, data: bytes) -> str:
    """The store key of the image's copy, after the checks an upload's images pass."""
    suffix = PurePosixPath(source).suffix.lower()
    try:
        read_image(data, name=source, limits=image_limits())
    except ValueError as exc:
        raise LabelError(str(exc)) from None
    return validate_key(f"{labels_prefix(product)}images/{sha256_hex(data)}{suffix}")


def label_history(store: Store, product: str, known: dict[str, LabelEntry] | None = None) -> list[LabelEntry]:
    """Every readable entry, oldest first; an unreadable one is named in a warning and skipped.
    ``known`` (key -> entry) keeps what was read for the next call: an entry is never rewritten,
    so a long-running reader (the review page) reads each once."""
    entries = []
    known = {} if known is None else known
    for key in sorted(store.list(_entries_prefix(product))):
        if key in known:
            entries.append(known[key])
            continue
        try:
            entries.append(known.setdefault(key, LabelEntry.from_json(store.get_bytes(key))))
        except ObjectNotFound:
            continue
        except (ValueError, TypeError) as exc:  # JSON, fields or values
            log.warning("%s: not a label entry (%s: %s); skipped", store.uri(key), type(exc).__name__, exc)
    return entries


def labelled_sources(labels: Iterable[LabelEntry]) -> set[str]:
    """Where the labelled images came from (a path, a store key, an s3:// address): what the review
    queue knows them by."""
    return {entry.source for entry in labels}


def current_labels(store: Store, product: str, known: dict[str, LabelEntry] | None = None) -> dict[str, LabelEntry]:
    """image sha256 -> its latest entry, for the images whose latest entry is not a retraction
    (``known``: as `label_history` keeps it)."""
    latest: dict[str, LabelEntry] = {}
    for entry in label_history(store, product, known):  # in order of their keys, which begin with the time
        latest[entry.image_sha256] = entry
    return {sha: entry for sha, entry in latest.items() if entry.label != RETRACTED}


@dataclass(frozen=True)
class LabelSnapshot:
    """A product's current labels at the start of a retraining: what trained and judged the version."""

    entries: tuple[LabelEntry, ...]  # in order of image hash

    @classmethod
    def of(cls, labels: dict[str, LabelEntry]) -> LabelSnapshot:
        return cls(tuple(labels[sha] for sha in sorted(labels)))

    @property
    def digest(self) -> str:
        """sha256 of the labelled images and their labels; "" without labels."""
        if not self.entries:
            return ""
        return sha256_hex("".join(f"{e.image_sha256} {e.label}\n" for e in self.entries).encode())

    def split(self, share: float) -> tuple[list[LabelEntry], list[LabelEntry]]:
        """(the labels that judge, the labels that train): a share of the labels by content hash
        (`in_hash_share`: a chance apart from how the images were drawn, so the judging ones keep
        their weights), never one without a `judging_weight`."""
        def judges(e: LabelEntry) -> bool:
            return e.judging_weight is not None and in_hash_share(e.image_sha256, share)

        return [e for e in self.entries if judges(e)], [e for e in self.entries if not judges(e)]

    def counts(self) -> dict[str, int]:
        return label_counts(self.entries)


def label_counts(entries: Iterable[LabelEntry]) -> dict[str, int]:
    """How many of ``entries`` say good and how many defect."""
    labels = [e.label for e in entries]
    return {label: labels.count(label) for label in (GOOD, DEFECT)}


def read_sources(store: Store, sources: Iterable[str]) -> list[tuple[str, bytes]]:
    """(name, bytes) of each local file, ``s3://BUCKET/KEY`` address (the review queue's), or else
    key of ``store``; a missing one is refused by name."""
    found = []
    for source in sources:
        if source.startswith("s3://"):
            bucket, _, key = source.removeprefix("s3://").partition("/")
            try:
                found.append((source, open_store(f"s3://{bucket}").get_bytes(validate_key(key))))
            except (ObjectNotFound, ValueError):
                raise LabelError(f"{source}: no such object") from None
            continue
        path = Path(source)
        if path.is_file():
            try:
                image_limits().check_bytes(path.stat().st_size, source)  # before a byte is read
            except ValueError as exc:
                raise LabelError(str(exc)) from None
            found.append((source, path.read_bytes()))  # as given: the review queue knows a file by its path
            continue
        try:
            found.append((source, store.get_bytes(validate_key(source))))
        except (ObjectNotFound, ValueError):
            raise LabelError(f"{source}: neither a file nor an object of {store.uri()}") from None
    return found


__all__ = ["AUDIT", "DEFECT", "GOOD", "HIGHEST_SCORE", "LABELS", "NEAR_THRESHOLD", "PICKED_FOR_SCORE", "RETRACTED",
           "LabelEntry", "LabelError", "LabelSnapshot", "add_labels", "current_labels",
           "default_labeller", "label_counts", "label_history", "labelled_sources", "labels_prefix", "read_sources"]
