"""Test-session guards shared by every test.

No traffic may leave 127.0.0.1: every socket connect/sendto to a non-loopback address fails the
test that made it (the guard records offenders too, in case a library swallows the error).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from infra.config import telemetry_off

telemetry_off()
# Prefect's ephemeral API keeps its SQLite database under PREFECT_HOME: one home per test process,
# so parallel workers (pytest-xdist) never share a database file and ~/.prefect is left alone.
PREFECT_HOME = tempfile.mkdtemp(prefix="fsad-test-prefect-")
os.environ["PREFECT_HOME"] = PREFECT_HOME

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BLOCKED: list[str] = []


def _is_local(address: object) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0] if isinstance(address, tuple) else None
    if host in (None, "localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_sendto = socket.socket.sendto


def _guarded_connect(self: socket.socket, address: object) -> None:
    if not _is_local(address):
        BLOCKED.append(repr(address))
        raise ConnectionRefusedError(f"test guard: connection to {address!r} outside 127.0.0.1 refused")
    return _connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: object) -> int:
    if not _is_local(address):
        BLOCKED.append(repr(address))
        raise ConnectionRefusedError(f"test guard: connection to {address!r} outside 127.0.0.1 refused")
    return _connect_ex(self, address)


def _guarded_sendto(self: socket.socket, data: bytes, *args: object) -> int:
    address = args[-1]
    if not _is_local(address):
        BLOCKED.append(repr(address))
        raise ConnectionRefusedError(f"test guard: datagram to {address!r} outside 127.0.0.1 refused")
    return _sendto(self, data, *args)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
socket.socket.sendto = _guarded_sendto  # type: ignore[method-assign]


@pytest.fixture(scope="session", autouse=True)
def no_traffic_outside_loopback():
    yield
    assert not BLOCKED, f"traffic outside 127.0.0.1 was attempted: {BLOCKED}"


@pytest.fixture(scope="session", autouse=True)
def own_prefect_home():
    yield
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA
