"""Who may use the review page, and proof that a form came from it.

One server token (``FSAD_REVIEW_TOKEN``) admits operators, who sign in with their name: the name
then goes with every label and action. The session is a signed cookie (HMAC with a key made at
start, so a restart signs everyone out), sent HttpOnly and SameSite=Strict. Every form carries a
CSRF token derived from the session, so a page elsewhere cannot post in an operator's name.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

TOKEN_ENV = "FSAD_REVIEW_TOKEN"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SESSION_HOURS = 12
MIN_TOKEN_CHARS = 16


class ReviewAccessError(RuntimeError):
    """The page cannot be served safely as asked; the message says what to set."""


def server_token(host: str, env: Mapping[str, str]) -> tuple[str, bool]:
    """(the token operators sign in with, whether it was made now): ``FSAD_REVIEW_TOKEN``, else on
    the loopback a new random one, which the caller prints once; any other host refuses to start."""
    token = env.get(TOKEN_ENV, "")
    if token:
        if len(token) < MIN_TOKEN_CHARS:
            raise ReviewAccessError(f"{TOKEN_ENV} is {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
        return token, False
    if host not in LOCAL_HOSTS:
        raise ReviewAccessError(f"serving on {host} needs {TOKEN_ENV} (at least {MIN_TOKEN_CHARS} characters); "
                                f"without it only 127.0.0.1 is served")
    return secrets.token_urlsafe(24), True


@dataclass
class Sessions:
    """Sign-in against the token, signed session cookies and their CSRF tokens."""

    token: str
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    clock: Callable[[], float] = time.time

    def sign_in(self, name: str, token: str) -> str | None:
        """The session cookie's value for ``name`` when ``token`` is the server's, else None."""
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return None
        body = f"{base64.urlsafe_b64encode(name.encode()).decode()}.{int(self.clock()) + SESSION_HOURS * 3600}"
        return f"{body}.{self._sign(body)}"

    def operator(self, cookie: str | None) -> str | None:
        """The signed-in name, None for a missing, forged or expired session."""
        if not cookie or cookie.count(".") != 2:
            return None
        body, signature = cookie.rsplit(".", 1)
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        name, expires = body.split(".")
        if not expires.isdigit() or int(expires) < self.clock():
            return None
        return base64.urlsafe_b64decode(name.encode()).decode()

    def csrf(self, cookie: str) -> str:
        return self._sign(f"csrf:{cookie}")

    def csrf_ok(self, cookie: str | None, sent: str | None) -> bool:
        return bool(cookie and sent) and hmac.compare_digest(str(sent), self.csrf(str(cookie)))

    def _sign(self, text: str) -> str:
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()


@dataclass
class RateLimit:
    """At most ``burst`` actions at once and ``per_second`` on average, per key (a token bucket)."""

    per_second: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def allow(self, key: str) -> bool:
        now = self.clock()
        tokens, then = self._buckets.get(key, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - then) * self.per_second)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        return True
