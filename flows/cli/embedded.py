"""Embedded defaults for commands that run the pipeline in a folder of their own (the demo, the
simulation): environment variables set for the run and restored after, and Prefect's ephemeral
API with its database in that folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

PREFECT_STARTUP_S = 180  # the ephemeral API server starts slowly on busy small machines


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the run and restore the caller's afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def ephemeral_prefect(home: Path) -> Iterator[None]:
    """Prefect's ephemeral API with its database under ``home`` (not a configured server)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    updates = {PREFECT_HOME: str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: PREFECT_STARTUP_S}
    with temporary_settings(updates=updates, restore_defaults={PREFECT_API_URL}):
        yield
