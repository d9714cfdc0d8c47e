"""The review queue of a product: which of the line's decided images people should look at, and why.

Each score-prefix run samples its new decisions in three strata, each image with its reason: the
highest scores (the likeliest defects), those nearest the threshold (where the model is least
sure), and an audit of the rest. Within a stratum the images are drawn by chance alone, from their
address's hash, so each image's chance of a review is known: the stratum's draws over its size.
Its weight, one over that chance, goes with its label, so that every labelled image can judge a
benchmark for the line's own mix (`labels.LabelSnapshot.split`, a weighted AUROC) and the share of
defects among the images the model passed can be estimated (`escape_estimate`). The queue is shown
in the order of the same hash: whatever part of it people label first is a chance part of it.

The queue is one object, ``products/P/queue.json``, holding the version's drawn images, labelled
or not (the record the escape estimate reads); an image already labelled leaves what people see.
Each queued image's thumbnail and overlay are drawn when it is queued, where the model is, and
kept under ``products/P/queue-media/vVERSION/UNIT/``: the review page shows them without ever
loading a model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

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
from fsad_core.evidence import effective_count, wilson_interval
from fsad_core.units import UNIT

STRATUM_SHARE = 0.1  # of a run's images: the highest scores, and as many again nearest the threshold
# Of a run's review budget (`LoopSettings.reviews_per_run`): the highest scores, those nearest the
# threshold, and the audit the rest; a stratum too small to take its part leaves it to the others.
ALLOCATION = {HIGHEST_SCORE: 0.4, NEAR_THRESHOLD: 0.3, AUDIT: 0.3}
THUMB, OVERLAY = "thumb", "overlay"  # the two pictures of a queued image
ITEM_ID = re.compile(r"[0-9a-f]{32}")  # `item_id`: what the review page names a queued image by


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
    reason: str  # HIGHEST_SCORE, NEAR_THRESHOLD or AUDIT: the stratum it was drawn from
    weight: float  # one over the chance it had of a review: how many of the line's images it stands for

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
    return picture_key(product, item.version, item.id, kind)


def picture_key(product: str, version: str, image_id: str, kind: str) -> str:
    """`media_key` from the parts the review page's picture address names, so that serving a
    picture never reads the queue."""
    if kind not in (THUMB, OVERLAY):
        raise ValueError(f"picture {kind!r}: {THUMB} or {OVERLAY}")
    if not ITEM_ID.fullmatch(image_id):
        raise ValueError(f"picture of {image_id!r}: not a queued image's id")
    return (f"{PRODUCTS}/{validate_name(product, 'product name')}/queue-media/v{validate_name(version)}/"
            f"{UNIT}/{image_id}-{kind}.png")


def drawn(items: Iterable[QueueItem]) -> dict[str, tuple[str, float]]:
    """Image -> (reason, weight) of queued images: what their labels keep (`labels.add_labels`)."""
    return {item.image: (item.reason, item.weight) for item in items}


def draw(image: str) -> int:
    """The image's place in every draw: its address's hash, which no score or person chooses."""
    return int(hashlib.sha256(image.encode()).hexdigest()[:16], 16)


def strata(decided: list[Decided]) -> dict[str, list[Decided]]:
    """A run's decisions by reason: the `STRATUM_SHARE` highest scores, of the rest as many nearest
    the threshold, and the rest, which the audit draws from."""
    size = math.ceil(len(decided) * STRATUM_SHARE)
    by_score = sorted(decided, key=lambda d: (-d.score, d.image))
    high, rest = by_score[:size], by_score[size:]
    near = sorted(rest, key=lambda d: (abs(d.score - d.threshold), d.image))[:size]
    taken = {d.image for d in near}
    return {HIGHEST_SCORE: high, NEAR_THRESHOLD: near, AUDIT: [d for d in rest if d.image not in taken]}


def allocation(sizes: dict[str, int], budget: int) -> dict[str, int]:
    """How many images each stratum gives to the budget: its `ALLOCATION` share (rounded up, the
    audit the remainder), at most its size; what a small stratum cannot give goes to the others."""
    take = {reason: min(sizes[reason], math.ceil(budget * ALLOCATION[reason])) for reason in (HIGHEST_SCORE,
                                                                                                NEAR_THRESHOLD)}
    take[AUDIT] = min(sizes[AUDIT], budget - sum(take.values()))
    for reason in (HIGHEST_SCORE, NEAR_THRESHOLD, AUDIT):
        take[reason] += min(sizes[reason] - take[reason], budget - sum(take.values()))
    return take


def pick(decided: Iterable[Decided], budget: int) -> list[QueueItem]:
    """A stratified sample of one run's new decisions: in each of the `strata`, its `allocation` of
    the budget drawn by `draw`, each image weighted by its stratum's size over its draws; in the
    order of `draw`."""
    groups = strata([d for d in decided if math.isfinite(d.score)])
    take = allocation({reason: len(group) for reason, group in groups.items()}, budget)
    items = [_item(d, reason, len(group) / take[reason])
             for reason, group in groups.items() for d in sorted(group, key=lambda d: draw(d.image))[:take[reason]]]
    return sorted(items, key=lambda item: draw(item.image))


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
    """Of the images the model passed, the share that is defective, estimated from the labelled
    drawn images it passed (each counted by its weight), with a 90 % interval."""

    passed_labelled: int
    defects: int
    rate: float
    low: float
    high: float


def escape_estimate(labels: Iterable[LabelEntry], queue: Iterable[QueueItem]) -> EscapeEstimate | None:
    """From the labels of the drawn images the champion passed (the stored queue, labelled images
    included); None before any. Wilson's interval (it stays inside [0, 1] for few and rare defects)
    on the weights' effective count, (sum w)^2 / sum w^2, which is the count when weights are equal."""
    passed = {i.image: i.weight for i in queue if not i.is_anomaly and i.weight > 0}
    found = [(passed[e.source], e.label == DEFECT) for e in labels if e.source in passed]
    if not found:
        return None
    weights, defective = np.array([w for w, _ in found]), np.array([d for _, d in found])
    rate = float(weights @ defective / weights.sum())
    return EscapeEstimate(len(found), int(defective.sum()), rate, *wilson_interval(rate, effective_count(weights)))


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
