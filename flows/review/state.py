"""What the review page shows of a product, read from the store and the registry as typed records.

The page never loads a model: versions are the registry's tags, the queue and its pictures what
score-prefix wrote, labels the label store's, the flag rate the line log's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from flows.mlops import registry
from flows.mlops.control import PINNED_TAG, Action, action_log
from flows.mlops.registry import tag_number
from flows.store.labels import LabelEntry
from flows.store.line_log import DayRate, flag_rates_by_day, line_runs, queue_growing
from flows.store.queue import QueueState, queue_state
from flows.store.storage import Store


@dataclass(frozen=True)
class VersionRow:
    version: str
    created: str  # UTC, to the minute
    run_id: str
    method: str
    auroc: float | None  # the benchmark AUROC the gate saw
    interval: tuple[float, float] | None  # its 90 % bootstrap interval, with labelled evidence
    evidence: str  # synthetic or labelled
    verdict: str  # passed, failed or "" before the gate
    reason: str
    champion_below_minimum: bool

    @classmethod
    def of(cls, record: registry.VersionRecord) -> VersionRow:
        tags = record.tags
        low, high = tag_number(tags.get("gate.candidate_auroc_low")), tag_number(tags.get("gate.candidate_auroc_high"))
        created = datetime.fromtimestamp(record.created_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        return cls(record.version, created, record.run_id, tags.get("method", "?"),
                   tag_number(tags.get("gate.candidate_auroc", tags.get("benchmark_auroc"))),
                   None if low is None or high is None else (low, high), tags.get("gate.evidence", "synthetic"),
                   tags.get("gate.verdict", ""), tags.get("gate.reason", ""),
                   tags.get("gate.champion_below_minimum") == "true")


@dataclass(frozen=True)
class ProductState:
    product: str
    champion: VersionRow | None
    pinned: bool
    versions: list[VersionRow]  # oldest first
    queue: QueueState
    days: list[DayRate]  # the flag rate per day, oldest first
    warnings: list[str]
    actions: list[Action]  # people's word over the gate, newest first

    @property
    def latest(self) -> VersionRow | None:
        return self.versions[-1] if self.versions else None


def product_state(store: Store, product: str, known: dict[str, LabelEntry] | None = None) -> ProductState:
    records = registry.versions(product)
    rows = [VersionRow.of(r) for r in records]
    champion = registry.aliases(product).get(registry.CHAMPION) if records else None
    runs = line_runs(store, product)
    days = flag_rates_by_day(runs)
    queue = queue_state(store, product, known)
    return ProductState(product, next((r for r in rows if r.version == champion), None),
                        bool(records) and registry.registered_model_tags(product).get(PINNED_TAG) == "true",
                        rows, queue, days, warnings(rows, days, queue_growing(runs)),
                        list(reversed(action_log(store, product)))[:10])


def warnings(rows: list[VersionRow], days: list[DayRate], growing: bool) -> list[str]:
    """What needs a person: a failed gate, a champion below the minimum, drift, a growing queue."""
    found = []
    latest = rows[-1] if rows else None
    if latest and latest.verdict == "failed":
        found.append(f"the last retraining (v{latest.version}) failed the gate: {latest.reason}")
    if latest and latest.champion_below_minimum:
        found.append("the champion is below the minimum AUROC on labelled evidence")
    if days and days[-1].drifted:
        low, high = days[-1].usual or (0.0, 0.0)
        found.append(f"flag rate {days[-1].rate:.1%} on {days[-1].day} is outside its usual band "
                     f"{low:.1%}-{high:.1%}: the line may have changed (drift)")
    if growing:
        found.append("the review queue has grown after each of the last runs: nobody is keeping up with it")
    return found
