"""How a fit tells what it is doing: each stage reports (stage, done, total) as its work goes by,
in steps small enough that a report comes every few seconds on one CPU thread, and `ProgressLine`
turns the reports into lines with an estimate of the time the stage has left."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

Progress = Callable[[str, int, int], None]


def report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


@dataclass
class ProgressLine:
    """Reports as lines ``LABEL: STAGE DONE/TOTAL, about N s left``: each new stage and each
    stage's end at once, otherwise at most one every ``every_s`` seconds."""

    emit: Callable[[str], None]
    label: str = ""
    every_s: float = 2.0  # with reports every few seconds at most, no line is over 10 s from the last
    clock: Callable[[], float] = time.monotonic
    _stage: tuple[str, int, int] = field(default=("", 0, 0), init=False)  # stage, its total, done so far
    _stage_start: float = field(default=0.0, init=False)
    _last: float = field(default=float("-inf"), init=False)

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        name, size, before = self._stage
        new = (stage, total) != (name, size) or done < before  # a stage may run twice (two input sides)
        if new:
            self._stage_start = now
        self._stage = (stage, total, done)
        if not (new or done >= total or now - self._last >= self.every_s):
            return
        self._last = now
        elapsed = now - self._stage_start  # an estimate from under a second of work says little
        left = f", about {_duration(elapsed / done * (total - done))} left" if 0 < done < total and elapsed >= 1 else ""
        self.emit(f"{self.label + ': ' if self.label else ''}{stage} {done}/{total}{left}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
