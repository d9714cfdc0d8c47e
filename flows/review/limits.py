"""ASGI middleware that bounds what a request may send and tells the browser what the page may do."""

from __future__ import annotations

from typing import Any

MAX_BODY_BYTES = 16 * 1024  # a label, an action or a sign-in form is far smaller
# Scripts, styles and pictures from this site only; no frames, forms post here only.
POLICY = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
          "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuses (413) a request whose body is, or turns out, larger than `MAX_BODY_BYTES`."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await _refuse(send)
        seen, started = 0, False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await _refuse(send)


async def _refuse(send: Any) -> None:
    body = f"request body over {MAX_BODY_BYTES} bytes or of unknown length\n".encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """Every answer: the content policy, no sniffing, no referrer, not framed; pages not cached."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                extra = {b"content-security-policy": POLICY.encode(), b"x-content-type-options": b"nosniff",
                         b"referrer-policy": b"no-referrer", b"x-frame-options": b"DENY",
                         b"cache-control": b"no-store"}
                headers += [(name, value) for name, value in extra.items() if name not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
