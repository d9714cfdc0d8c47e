"""The retry policy of every Prefect task that reads or writes storage or the registry (the
retraining, the sweep, the prefix scorer): retried after FSAD_IO_RETRY_DELAYS when the failure may
pass (a service down, the network), never for bad input."""

from __future__ import annotations

from typing import Any

from flows.mlops.registry import RegistryError
from flows.settings import SettingsError, io_retry_delays
from flows.store.storage import ObjectNotFound, StorageKeyError
from flows.store.upload import ManifestError
from flows.store.validation import UploadNotFound


class PermanentError(RuntimeError):
    """A failure a second try cannot mend (there is no upload to train on, ...)."""


_PERMANENT = (PermanentError, ManifestError, ObjectNotFound, StorageKeyError, UploadNotFound, RegistryError,
              SettingsError, ValueError, TypeError)


def _transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry only what may succeed on a second try (network, services), not bad input."""
    try:
        state.result()
    except _PERMANENT:
        return False
    except Exception:
        return True
    return False


_DELAYS = io_retry_delays()
IO_RETRIES = dict(retries=len(_DELAYS), retry_delay_seconds=_DELAYS, retry_condition_fn=_transient)
