"""What every request goes through before a route sees it, as plain ASGI wrappers (cheaper
per request than Starlette's BaseHTTPMiddleware): the request metrics, the bearer token, and the
body size limit.

Order, outermost first: metrics (so refusals are counted too), token, size.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from engine.serve.metrics import Metrics

Scope = dict[str, Any]
ASGI = Callable[[Scope, Callable, Callable], Awaitable[None]]

OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")


async def _send_json(send: Callable, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def endpoint_of(scope: Scope) -> str:
    """The route template that answered (``/v2/models/{name}/infer``), or ``other``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "other"


class RequestMetrics:
    def __init__(self, app: ASGI, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = endpoint_of(scope)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


class BearerToken:
    """With a token set, every path but the health probes needs ``Authorization: Bearer``."""

    def __init__(self, app: ASGI, token: str | None):
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if not hmac.compare_digest(given, self.expected):  # constant time: no timing oracle
            await _send_json(
                send,
                401,
                {"error": "this server needs 'Authorization: Bearer <token>' (serve.token)"},
                [(b"www-authenticate", b'Bearer realm="engine"')],
            )
            return
        await self.app(scope, receive, send)


def refusal(size: str, limit: int) -> dict:
    return {
        "error": f"the request body is {size} bytes, over serve.max_body_bytes="
        f"{limit}; send fewer rows per request.",
        "field": "body",
    }


class BodyLimit:
    """Refuse a body over ``limit`` bytes with 413: by its Content-Length before reading it,
    or, sent in chunks without one, as soon as it grows past the limit."""

    def __init__(self, app: ASGI, limit: int):
        self.app = app
        self.limit = limit

    def _refusal(self, size: str) -> dict:
        return refusal(size, self.limit)

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_json(send, 413, self._refusal(length.decode()), [(b"connection", b"close")])
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if not started:
                await _send_json(send, 413, self._refusal(f"over {self.limit}"))


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a chunked body passes the limit; the app answers 413."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.limit = limit
