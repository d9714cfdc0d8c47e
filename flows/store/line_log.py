"""What a product's line decided, one record a run of score-prefix: the flag rate per day and the
queue's length over time, which the review page watches for drift and for a queue that nobody works.

Records are append-only (`flows.store.records`); one that cannot be read is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass

from flows.store.records import append_record, record_time
from flows.store.storage import PRODUCTS, ObjectNotFound, Store, validate_name

BAND_DAYS = 7  # the days before one that set its usual band
BAND_SIGMAS = 3.0  # how many binomial standard errors from the usual rate a day may be
GROWING_RUNS = 3  # a queue longer after each of this many runs in a row is growing
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LineRun:
    at: str  # UTC, as `record_time` writes it
    version: str  # the champion that decided
    scored: int
    flagged: int
    unreadable: int
    queued: int  # the review queue's length after the run


@dataclass(frozen=True)
class DayRate:
    day: str  # YYYYMMDD, UTC
    scored: int
    flagged: int
    usual: tuple[float, float] | None  # the band the earlier days set; None on the first day

    @property
    def rate(self) -> float:
        return self.flagged / self.scored if self.scored else 0.0

    @property
    def drifted(self) -> bool:
        return self.usual is not None and not self.usual[0] <= self.rate <= self.usual[1]


def line_runs_prefix(product: str) -> str:
    return f"{PRODUCTS}/{validate_name(product, 'product name')}/line-runs/"


def record_line_run(store: Store, product: str, version: str, scored: int, flagged: int, unreadable: int,
                    queued: int) -> LineRun:
    run = LineRun(record_time(), version, scored, flagged, unreadable, queued)
    append_record(store, line_runs_prefix(product), run.at, json.dumps(asdict(run), sort_keys=True))
    return run


def line_runs(store: Store, product: str) -> list[LineRun]:
    """The product's runs, oldest first."""
    runs = []
    for key in sorted(store.list(line_runs_prefix(product))):
        try:
            runs.append(LineRun(**json.loads(store.get_bytes(key))))
        except ObjectNotFound:
            continue
        except (ValueError, TypeError) as exc:
            log.warning("%s: not a line run (%s: %s); skipped", store.uri(key), type(exc).__name__, exc)
    return runs


def flag_rates_by_day(runs: list[LineRun]) -> list[DayRate]:
    """The flag rate of each day with its usual band: the pooled rate of up to `BAND_DAYS` days
    before it, give or take `BAND_SIGMAS` binomial standard errors at the day's count (a small
    day may swing further than a large one before it counts as drift)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for run in runs:
        counts[run.at[:8]][0] += run.scored
        counts[run.at[:8]][1] += run.flagged
    days = sorted(counts)
    rates = []
    for i, day in enumerate(days):
        earlier = [counts[d] for d in days[max(0, i - BAND_DAYS):i]]
        scored, flagged = counts[day]
        rates.append(DayRate(day, scored, flagged, _band(earlier, scored)))
    return rates


def _band(earlier: list[list[int]], scored: int) -> tuple[float, float] | None:
    total = sum(n for n, _ in earlier)
    if not total or not scored:
        return None
    usual = sum(f for _, f in earlier) / total
    # A usual rate of zero would make any flag drift: floor it at one flag in the earlier days.
    spread = BAND_SIGMAS * math.sqrt(max(usual, 1 / total) * (1 - usual) / scored)
    return max(0.0, usual - spread), min(1.0, usual + spread)


def queue_growing(runs: list[LineRun]) -> bool:
    """Whether the review queue grew after each of the last `GROWING_RUNS` runs."""
    lengths = [run.queued for run in runs[-GROWING_RUNS - 1:]]
    return len(lengths) > GROWING_RUNS and all(b > a for a, b in zip(lengths, lengths[1:]))
