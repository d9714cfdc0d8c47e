"""The review queue of a product: which of the line's decided images people should look at, and why.

Three reasons, each kept with the image: those nearest the threshold (where the model is least
sure), the highest unlabelled scores (the likeliest defects), and a random audit share of
everything decided. An audited image is picked by chance alone, from its key, with a known
probability, so its label stands for the line: audits estimate how many defects the model lets
pass (`escape_estimate`), and their weight (one over that probability) lets them judge. Images
picked for their score never judge (`labels.PICKED_FOR_SCORE`).

The queue is one object, ``products/P/queue.json``, rewritten whole when score-prefix has decided
new images; an image already labelled leaves it. Each queued image's thumbnail and overlay are
drawn then, where the model is, and kept under ``products/P/queue-media/vVERSION/UNIT/``: the
review page shows them without ever loading a model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from flows.store.labels import (
    AUDIT,
    DEFECT,
    HIGHEST_SCORE,
    NEAR_THRESHOLD,
    LabelEntry,
    current_labels,
    label_counts,
    labelled_sources,
)
from flows.store.storage import PRODUCTS, ObjectNotFound, Store, validate_name
from fsad_core.evidence import in_hash_share
from fsad_core.units import UNIT

AUDIT_RATE = 0.05  # the chance of any decided image to be audited
DEFAULT_SIZE = 24  # images picked for their score, at most: half near the threshold, half the highest
THUMB, OVERLAY = "thumb", "overlay"  # the two pictures of a queued image


@dataclass(frozen=True)
class Decided:
    """A decision of the champion on one image of the line, as score-prefix wrote it."""

    image: str  # where the image is: a path or an s3:// address `fsad label` reads
    score: float
    threshold: float
    is_anomaly: bool
    version: str


@dataclass(frozen=True)
class QueueItem:
    image: str
    score: float
    threshold: float
    is_anomaly: bool
    version: str
    reason: str  # NEAR_THRESHOLD, HIGHEST_SCORE or AUDIT
    weight: float  # one over the chance it had of an audit; 0 for a pick by score, which never judges

    @property
    def id(self) -> str:
        """What the review page names the item by: no address from a request ever reaches the store."""
        return item_id(self.image)


def item_id(image: str) -> str:
    return hashlib.sha256(image.encode()).hexdigest()[:32]


def queue_key(product: str) -> str:
    return f"{PRODUCTS}/{validate_name(product, 'product name')}/queue.json"


def media_key(product: str, item: QueueItem, kind: str) -> str:
    """Where the `THUMB` or `OVERLAY` PNG of a queued image is, by the version that decided it and the score unit."""
    if kind not in (THUMB, OVERLAY):
        raise ValueError(f"picture {kind!r}: {THUMB} or {OVERLAY}")
    return (f"{PRODUCTS}/{validate_name(product, 'product name')}/queue-media/v{validate_name(item.version)}/"
            f"{UNIT}/{item.id}-{kind}.png")


def audited(image: str, rate: float = AUDIT_RATE) -> bool:
    """Whether the audit picks this image: by chance alone (its address's hash), never by its score."""
    return in_hash_share(hashlib.sha256(image.encode()).hexdigest(), rate)


def pick(decided: Iterable[Decided], labelled: set[str], size: int = DEFAULT_SIZE,
         rate: float = AUDIT_RATE) -> list[QueueItem]:
    """The queue: up to ``size`` decided images not yet labelled (``labelled``: their addresses)
    picked for their score, nearest the threshold first, then every audited one, labelled or not
    (the audit's record: `read_queue` leaves out what is labelled)."""
    scored = [d for d in decided if math.isfinite(d.score)]
    audits = [_item(d, AUDIT, 1 / rate) for d in scored if audited(d.image, rate)]
    rest = [d for d in scored if d.image not in labelled and not audited(d.image, rate)]
    near = sorted(rest, key=lambda d: abs(d.score - d.threshold))[:size // 2]
    taken = {d.image for d in near}
    highest = sorted((d for d in rest if d.image not in taken), key=lambda d: -d.score)[:size - len(near)]
    return [*(_item(d, NEAR_THRESHOLD, 0.0) for d in near), *(_item(d, HIGHEST_SCORE, 0.0) for d in highest),
            *audits]


def _item(decision: Decided, reason: str, weight: float) -> QueueItem:
    return QueueItem(decision.image, decision.score, decision.threshold, decision.is_anomaly, decision.version,
                     reason, weight)


def write_queue(store: Store, product: str, items: list[QueueItem]) -> None:
    store.put_bytes(queue_key(product), json.dumps([asdict(i) for i in items], indent=1).encode(), "application/json")


def read_queue(store: Store, product: str) -> list[QueueItem]:
    """The stored queue, its labelled audits included; [] before the first."""
    try:
        return [QueueItem(**i) for i in json.loads(store.get_bytes(queue_key(product)))]
    except ObjectNotFound:
        return []


@dataclass(frozen=True)
class EscapeEstimate:
    """Of the audited images the model passed, the share people found defective, with a 90 % interval."""

    passed_audited: int
    defects: int
    rate: float
    low: float
    high: float


def escape_estimate(labels: Iterable[LabelEntry], queue: Iterable[QueueItem]) -> EscapeEstimate | None:
    """From the labels of the audited images the champion passed (the stored queue, labelled
    images included); None before any. Wilson's interval stays inside [0, 1] for few and rare defects."""
    passed_audits = {i.image for i in queue if i.reason == AUDIT and not i.is_anomaly}
    passed = [e for e in labels if e.source in passed_audits]
    if not passed:
        return None
    n, k, z = len(passed), sum(e.label == DEFECT for e in passed), 1.6449
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return EscapeEstimate(n, k, k / n, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class QueueState:
    """The queue less what is labelled, the labels as the store resolves them, and the escape estimate."""

    items: list[QueueItem]
    labels: dict[str, LabelEntry]
    escape: EscapeEstimate | None

    @property
    def counts(self) -> dict[str, int]:
        return label_counts(self.labels.values())

    @property
    def defect_types(self) -> list[str]:
        return sorted({e.defect_type for e in self.labels.values() if e.defect_type})


def queue_state(store: Store, product: str, known: dict[str, LabelEntry] | None = None) -> QueueState:
    """The product's queue and labels, each read once (``known``: the label entries read before,
    `label_history`); the audits already labelled count in the escape estimate."""
    labels = current_labels(store, product, known)
    stored = read_queue(store, product)
    labelled = labelled_sources(labels.values())
    return QueueState([i for i in stored if i.image not in labelled], labels, escape_estimate(labels.values(), stored))
