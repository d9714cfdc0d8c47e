"""Append-only records of what people said and did (labels, actions over the gate): each record an
object of its own, named by the time it was made and a random suffix, so that writers at once never
overwrite each other, nothing is rewritten, and the keys sort in time."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from flows.store.storage import Store

MAX_TEXT = 200  # characters of a name, a reason or a defect type


def checked_text(value: str, what: str, error: type[ValueError] = ValueError) -> str:
    """``value`` stripped, or ``error`` naming ``what`` unless it is 1 to MAX_TEXT printable characters."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT or not value.isprintable():
        raise error(f"{what} {value!r}: 1 to {MAX_TEXT} printable characters")
    return value.strip()


def record_time() -> str:
    """UTC to the microsecond, in a form that sorts as text."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def append_record(store: Store, prefix: str, at: str, text: str) -> str:
    """Write one record under ``prefix`` as a new object; its key."""
    key = f"{prefix}{at}-{secrets.token_hex(4)}.json"
    store.put_bytes(key, text.encode(), "application/json")
    return key
