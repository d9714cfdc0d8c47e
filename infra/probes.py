"""Cheap health probes (HTTP GET, TCP connect) with short timeouts, stdlib only."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from infra.config import HOST

# Never route the stack's own 127.0.0.1 probes through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    """HTTP status of an unauthenticated GET, or None when nothing answers."""
    try:
        with _OPENER.open(urllib.request.Request(url, method="GET"), timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    status = http_status(url, timeout_s)
    return status is not None and 200 <= status < 300


def tcp_ok(port: int, host: str = HOST, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def http_post_json(url: str, body: object, timeout_s: float = 3.0) -> object | None:
    """JSON answer of a POST with a JSON body, or None on any error."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None
