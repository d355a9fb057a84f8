"""Pure-ASGI middleware: request body size limit (413) and per-status HTTP counters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import Response

from specmux.server.errors import json_error
from specmux.server.metrics import ServerMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/health",
                       "/metrics"})


class Guard:
    """Body size limit and HTTP counters around the app.

    The body is read (up to the limit) before the app sees it and replayed to it; later
    ``receive`` calls go to the server, so the app still sees the client disconnect.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: ServerMetrics) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if isinstance(body, Response):
                await body(scope, receive, send_counted)
                return
            if body is None:  # the client went away while sending
                status[0] = 499
                return
            await self.app(scope, _replay(body, receive), send_counted)
        finally:
            self.metrics.http_requests.labels(endpoint=endpoint, status=str(status[0])).inc()

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | Response | None:
        limit = self.max_body_bytes
        too_large = json_error(413, f"the request body exceeds {limit} bytes",
                               code="request_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return json_error(400, "invalid Content-Length header")
                if declared > limit:
                    return too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that first returns the whole ``body``, then defers to the server."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
