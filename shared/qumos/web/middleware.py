"""The services' ASGI middleware: unhandled errors, body-size limit, in-flight limit,
Prometheus request metrics, and quiet health checks in the access log. Plain ASGI (each costs a few
hundredths of a millisecond per request)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from qumos.errors import BodyTooLarge
from qumos.web.errors import error_json, internal_error


class Sent:
    """`send`, noting the response's status once its start was sent (None before)."""

    def __init__(self, send):
        self.send, self.status = send, None

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


class InternalErrorMiddleware:
    """Innermost: an exception that no handler took (a bug) becomes the 500 "internal"
    answer here, logged with its traceback, instead of propagating to the server; the
    service stays up and the request is counted as a 5xx like any other."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = Sent(send)
        try:
            await self.app(scope, receive, sent)
        except Exception as e:  # nothing escapes unanswered
            if sent.status is not None:
                raise
            await internal_error(scope, e)(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses bodies over `limit` bytes with 413, by Content-Length or by counting the
    bytes actually received (chunked bodies)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    resp = error_json(
                        413,
                        "body_too_large",
                        BodyTooLarge(self.limit).message,
                        "body",
                        headers={"Connection": "close"},
                        path=scope.get("path"),
                    )
                    return await resp(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        sent = Sent(send)
        try:
            await self.app(scope, limited_receive, sent)
        except BodyTooLarge as e:
            if sent.status is not None:
                raise
            resp = error_json(413, e.type, e.message, e.field, path=scope.get("path"))
            await resp(scope, receive, send)


UNLIMITED_PATHS = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")


class QuietHealthChecks(logging.Filter):
    """Drops uvicorn's access-log lines of successful health and readiness probes (every
    5 s per container), so that a service's log shows its real traffic."""

    def filter(self, record: logging.LogRecord) -> bool:
        a = record.args
        return not (
            isinstance(a, tuple)
            and len(a) >= 5
            and a[4] == 200
            and str(a[2]).split("?")[0] in UNLIMITED_PATHS
        )


class ConcurrencyLimitMiddleware:
    """At most `limit` requests in flight; the next one is refused at once with 503
    "overloaded" and `Retry-After` (a non-blocking acquire: nothing queues without bound).
    Health, readiness and metrics are never limited, so a busy service is not restarted."""

    def __init__(
        self, app, limit: int, retry_after: int = 1, on_reject: Callable[[], None] | None = None
    ):
        self.app, self.limit, self.retry_after = app, limit, retry_after
        self.on_reject = on_reject
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in UNLIMITED_PATHS:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            if self.on_reject is not None:
                self.on_reject()
            resp = error_json(
                503,
                "overloaded",
                f"the service is at its limit of "
                f"{self.limit} requests in flight; retry after "
                f"{self.retry_after}s",
                headers={"Retry-After": str(self.retry_after)},
                path=scope.get("path"),
            )
            return await resp(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class MetricsMiddleware:
    """Prometheus request metrics, as a plain ASGI middleware: `http_requests_total`
    {handler, method, status} and `http_request_duration_seconds` {handler, method}, where
    handler is the route's path template (`/v1/fragments/{fragment_id}/execute`; "none"
    when no route matched) and status the class ("2xx", "4xx", ...). About 0.02 ms per
    request (the label children are cached), where prometheus-fastapi-instrumentator
    took ~0.15 ms -- four exchanges sit under every prediction."""

    def __init__(self, app, registry, excluded: tuple[str, ...] = ("/metrics",)):
        from prometheus_client import Counter, Histogram

        self.app, self.excluded = app, excluded
        self.requests = Counter(
            "http_requests",
            "HTTP requests by route, method and status class",
            ["handler", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "time from the request to the end of the answer",
            ["handler", "method"],
            registry=registry,
        )
        self._children: dict[tuple, tuple] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.excluded:
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        sent = Sent(send)
        try:
            await self.app(scope, receive, sent)
        finally:
            route = scope.get("route")
            status = 500 if sent.status is None else sent.status
            key = (getattr(route, "path", "none"), scope.get("method", ""), status // 100)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = (
                    self.requests.labels(key[0], key[1], f"{key[2]}xx"),
                    self.duration.labels(key[0], key[1]),
                )
            child[0].inc()
            child[1].observe(time.perf_counter() - t0)
