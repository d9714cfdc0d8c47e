"""Memory that concurrent callers share: each asks for its share before it allocates, waits while
others hold the rest, and is refused when the wait runs out; a share larger than the whole is
never granted, so callers size their work to fit first (`MemoryBudget.total`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class MemoryBudget:
    """A count of bytes held by work in flight, at most ``total`` at once."""

    def __init__(self, total: int):
        if total < 1:
            raise ValueError(f"a memory budget needs at least one byte, got {total}")
        self.total = total
        self._held = 0
        self._changed = threading.Condition()

    @property
    def held(self) -> int:
        return self._held

    @contextmanager
    def share(self, amount: int, wait_s: float) -> Iterator[bool]:
        """Hold ``amount`` bytes for the block, waiting up to ``wait_s`` for them; yields whether
        they were granted (a block that was not granted must not allocate them)."""
        if amount > self.total:
            raise ValueError(f"{amount} bytes asked of a budget of {self.total}")
        with self._changed:
            granted = self._changed.wait_for(lambda: self._held + amount <= self.total, timeout=wait_s)
            if granted:
                self._held += amount
        try:
            yield granted
        finally:
            if granted:
                with self._changed:
                    self._held -= amount
                    self._changed.notify_all()
