"""Which TCP addresses the stack's processes listen on.

Why: the services hold test credentials and no auth (MLflow, Prefect); they must be reachable
from this machine only. ``listening_addresses`` lets ``up`` and the tests assert 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Mapping

import psutil


def listening_by_pid() -> dict[int, list[tuple[str, int]]]:
    """All listening TCP sockets of the machine visible to us, grouped by owning pid."""
    found: dict[int, list[tuple[str, int]]] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid is not None and conn.laddr:
            found.setdefault(conn.pid, []).append((conn.laddr.ip, conn.laddr.port))
    return found


def listening_of(service_pids: Mapping[str, int]) -> dict[str, list[tuple[str, int]]]:
    """Listening (ip, port) pairs of each service, including its child processes."""
    by_pid = listening_by_pid()
    result: dict[str, list[tuple[str, int]]] = {}
    for name, pid in service_pids.items():
        try:
            root = psutil.Process(pid)
            pids = [pid, *(child.pid for child in root.children(recursive=True))]
        except psutil.Error:
            pids = [pid]
        result[name] = sorted({addr for p in pids for addr in by_pid.get(p, [])})
    return result


def non_loopback(addresses: Mapping[str, list[tuple[str, int]]]) -> list[str]:
    """``service ip:port`` entries not bound to 127.0.0.1 (should be empty)."""
    return [f"{name} {ip}:{port}" for name, addrs in addresses.items()
            for ip, port in addrs if ip != "127.0.0.1"]
