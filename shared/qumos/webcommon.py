"""What every QuMoS service shares: JSON errors, a request-size limit, settings loading,
metrics, bearer-token checks, body parsing, and `hot_route` for the endpoints on every
prediction's path. Imports FastAPI/Starlette (services only).

Error responses are `{"error": {"type", "message", "field"?}}`, except under /v2 (the Open
Inference Protocol) where they are the protocol's `{"error": "<message>"}` (the message
still starts with the field):

    ServiceError (HTTPException subclass)   raised by handlers: status, type, message, field
    ├── BodyTooLarge                        413, raised by the body-limit middleware
    RequestValidationError / ValidationError   422 naming the field
    overload (ConcurrencyLimitMiddleware)   503 "overloaded" + Retry-After, never queued
    any other exception                     500 "internal" (logged, never the traceback)

Credentials: tokens come from files (`read_token_file`), are compared with
`hmac.compare_digest` and never appear in a log line or an error message.
"""

from __future__ import annotations

import gc
import hmac
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from qumos.client import ErrorBody, OipErrorBody, describe_validation_error, format_loc
from qumos.errors import QumosError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("qumos.service")
M = TypeVar("M", bound=BaseModel)


class ServiceError(StarletteHTTPException):
    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: dict | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.type, self.message, self.field = type_, message, field


class BodyTooLarge(ServiceError):
    def __init__(self, limit: int):
        super().__init__(413, "body_too_large",
                         f"body: request body exceeds {limit} bytes; allowed: at most {limit}",
                         "body")


class SettingsError(QumosError):
    """Missing or invalid settings: names the environment variable."""


def is_oip_path(path: str | None) -> bool:
    """Paths of the Open Inference Protocol v2, whose errors are {"error": "<string>"}."""
    return path is not None and (path == "/v2" or path.startswith("/v2/"))


def error_json(status: int, type_: str, message: str, field: str | None = None,
               headers: dict | None = None, path: str | None = None) -> JSONResponse:
    """The error body; `path` (the request's) picks the protocol's shape under /v2."""
    if is_oip_path(path):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    err = {"type": type_, "message": message}
    if field is not None:
        err["field"] = field
    return JSONResponse({"error": err}, status_code=status, headers=headers)


def freeze_startup_heap() -> None:
    """Call once a service has loaded (end of its lifespan's start-up, and after a
    deploy: transpiling loads much of qiskit lazily). Moves every object
    alive now -- the imported libraries (qiskit, numpy, FastAPI: millions of objects) and
    the loaded models -- out of the garbage collector's generations (`gc.freeze`). A full
    collection then scans only what requests allocate, instead of pausing a request for
    ~100+ ms now and then (seen as p99 outliers and lost batch-256 throughput). The cost:
    what a later delete drops stays in memory (a fragment's circuit: small, deploys are
    rare)."""
    gc.collect()
    gc.freeze()


def load_settings(cls, settings=None):
    """Build pydantic-settings `cls` from the environment; a clear error names the variable."""
    if settings is not None:
        return settings
    prefix = cls.model_config.get("env_prefix", "")
    try:
        return cls()
    except ValidationError as e:
        problems = []
        for err in e.errors():
            var = prefix + str(err["loc"][0]).upper() if err.get("loc") else prefix
            what = "is required but not set" if err["type"] == "missing" else err["msg"]
            problems.append(f"{var} {what}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


def read_token_file(path: Path, var: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise SettingsError(f"{var}: cannot read token file {path} ({e.strerror})") from None
    if len(token) < 16:
        raise SettingsError(f"{var}: token file {path} holds no token of at least 16 characters")
    return token


def check_bearer(request: Request, token: str) -> None:
    """401 without credentials, 403 with wrong ones (constant-time comparison)."""
    auth = request.headers.get("authorization")
    if not auth:
        raise ServiceError(401, "unauthorized", "authorization: missing; send "
                           "'Authorization: Bearer <token>'", "authorization",
                           headers={"WWW-Authenticate": "Bearer"})
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                             token.encode()):
        raise ServiceError(403, "forbidden", "authorization: the bearer token is not valid "
                           "for this service", "authorization")


async def parse_body(request: Request, model: type[M]) -> M:
    """Parse the JSON body as `model` (any content type); 422 naming the field."""
    body = await request.body()
    if not body:
        raise ServiceError(422, "validation_error", "body: empty; send a JSON object", "body")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        field, message = describe_validation_error(e)
        raise ServiceError(422, "validation_error", message, field) from None


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
                    resp = error_json(413, "body_too_large", BodyTooLarge(self.limit).message,
                                      "body", headers={"Connection": "close"},
                                      path=scope.get("path"))
                    return await resp(scope, receive, send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:
            if started:
                raise
            resp = error_json(413, e.type, e.message, e.field, path=scope.get("path"))
            await resp(scope, receive, send)


UNLIMITED_PATHS = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")


class QuietHealthChecks(logging.Filter):
    """Drops uvicorn's access-log lines of successful health and readiness probes (every
    5 s per container), so that a service's log shows its real traffic."""

    def filter(self, record: logging.LogRecord) -> bool:
        a = record.args
        return not (isinstance(a, tuple) and len(a) >= 5 and a[4] == 200
                    and str(a[2]).split("?")[0] in UNLIMITED_PATHS)


class ConcurrencyLimitMiddleware:
    """At most `limit` requests in flight; the next one is refused at once with 503
    "overloaded" and `Retry-After` (a non-blocking acquire: nothing queues without bound).
    Health, readiness and metrics are never limited, so a busy service is not restarted."""

    def __init__(self, app, limit: int, retry_after: int = 1,
                 on_reject: Callable[[], None] | None = None):
        self.app, self.limit, self.retry_after = app, limit, retry_after
        self.on_reject = on_reject
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in UNLIMITED_PATHS:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            if self.on_reject is not None:
                self.on_reject()
            resp = error_json(503, "overloaded", f"the service is at its limit of "
                              f"{self.limit} requests in flight; retry after "
                              f"{self.retry_after}s", headers={
                                  "Retry-After": str(self.retry_after)}, path=scope.get("path"))
            return await resp(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class HotRoutes:
    """Serves the few endpoints on every prediction's path (a provider's execute, the
    orchestrator's predict and infer) without FastAPI's routing and dependency solving,
    which cost ~0.15-0.3 ms per request here (regex over every route, parameter
    resolution) -- four such exchanges sit under every batch-1 prediction.

    Registered with `hot_route`, which also registers the same function as an ordinary
    FastAPI route (the OpenAPI schema, and the same behaviour if this layer were absent).
    Sits inside the services' own middleware (metrics, in-flight and body limits), so those
    apply unchanged; errors become the same JSON bodies as everywhere (`ServiceError` ->
    its status, anything else -> 500 "internal", logged)."""

    def __init__(self, app, routes: list):
        self.app, self.routes = app, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for method, pattern, route, endpoint in self.routes:
                m = pattern.fullmatch(scope["path"]) if scope["method"] == method else None
                if m is not None:
                    scope["path_params"] = params = m.groupdict()
                    scope["route"] = route
                    try:
                        response = await endpoint(request=Request(scope, receive), **params)
                    except ServiceError as e:
                        response = error_json(e.status_code, e.type, e.message, e.field,
                                              headers=e.headers, path=scope["path"])
                    except Exception as e:
                        response = _internal_error(scope, e)
                    return await response(scope, receive, send)
        await self.app(scope, receive, send)


def hot_route(app: FastAPI, method: str, path: str, **route_kwargs):
    """Decorator: `endpoint(request, **path_params) -> Response` served by `HotRoutes`
    (installed by `install_common`), and documented as a FastAPI route with
    `route_kwargs` (response_model, responses, ...). Path parameters match one segment."""

    def register(endpoint):
        app.add_api_route(path, endpoint, methods=[method], **route_kwargs)
        route = app.routes[-1]
        pattern = re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)))
        app.state.hot_routes.append((method, pattern, route, endpoint))
        return endpoint

    return register


def _internal_error(scope, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", scope.get("method"), scope.get("path"),
              exc_info=exc)
    return error_json(500, "internal", f"internal error ({type(exc).__name__}); "
                      "the service is still up", path=scope.get("path"))


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
        self.requests = Counter("http_requests", "HTTP requests by route, method and status "
                                "class", ["handler", "method", "status"], registry=registry)
        self.duration = Histogram("http_request_duration_seconds", "time from the request "
                                  "to the end of the answer", ["handler", "method"],
                                  registry=registry)
        self._children: dict[tuple, tuple] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.excluded:
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def tracking_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            key = (getattr(route, "path", "none"), scope.get("method", ""), status // 100)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = (
                    self.requests.labels(key[0], key[1], f"{key[2]}xx"),
                    self.duration.labels(key[0], key[1]))
            child[0].inc()
            child[1].observe(time.perf_counter() - t0)


# Responses every documented endpoint may give (for the OpenAPI schema).
ERROR_DESCRIPTIONS = {
    401: "no credentials", 403: "wrong credentials", 404: "unknown model, fragment or job",
    409: "the service cannot do this now (e.g. the attacker holds no breached provider)",
    413: "body or batch too large", 422: "invalid input (names the field)",
    500: "internal error", 502: "a provider sent a bad or tampered answer",
    503: "overloaded or a provider is unavailable (Retry-After)",
    504: "a provider did not answer in time", 507: "the data directory cannot be written",
    429: "over the API key's quota (Retry-After, RateLimit-* headers)",
}


def error_responses(*codes: int, oip: bool = False) -> dict:
    """`responses=` for a route: the JSON error body under each status (`oip`: the Open
    Inference Protocol's {"error": "<string>"}, for /v2 routes)."""
    model = OipErrorBody if oip else ErrorBody
    return {c: {"model": model, "description": ERROR_DESCRIPTIONS[c]} for c in codes}


def document_request_bodies(app: FastAPI, bodies: dict[tuple[str, str], type[BaseModel]]
                            ) -> None:
    """Routes parse their bodies themselves (`parse_body`, for clear errors on any content
    type); this puts those request models into the OpenAPI schema, so clients and
    schemathesis see the contract. `bodies`: {(path, method): model}."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in bodies.values()],
                                     ref_template="#/components/schemas/{model}")
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, d in defs.get("$defs", {}).items():
            comps.setdefault(name, d)
        for (path, method), model in bodies.items():
            op = schema["paths"][path][method]
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_common(app: FastAPI, max_body_bytes: int, registry=None,
                   max_inflight: int | None = None, retry_after: int = 1) -> None:
    """JSON error handlers, the body limit, the in-flight limit and Prometheus /metrics."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return error_json(exc.status_code, exc.type, exc.message, exc.field,
                          headers=getattr(exc, "headers", None), path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"path: {request.url.path} is not an endpoint of this service"
        if exc.status_code == 405:  # Starlette names only the first matching route's methods
            allow = allowed_methods(request.app, request.scope)
            headers = {**(headers or {}), "Allow": ", ".join(allow)}
            msg = (f"method: {request.method} is not allowed on {request.url.path}; "
                   f"allowed: {', '.join(allow)}")
        return error_json(exc.status_code, kind, msg, headers=headers, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        field = format_loc(err.get("loc", ()))
        return error_json(422, "validation_error", f"{field}: {err.get('msg')}", field,
                          path=request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return _internal_error(request.scope, exc)

    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QuietHealthChecks) for f in access.filters):
        access.addFilter(QuietHealthChecks())
    app.state.hot_routes = []
    app.add_middleware(HotRoutes, routes=app.state.hot_routes)  # first = innermost
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    reg = registry if registry is not None else CollectorRegistry()
    app.state.metrics_registry = reg
    if max_inflight is not None:
        rejected = Counter("qumos_overload_rejections", "requests refused with 503 because "
                           "the in-flight limit was reached", registry=reg)
        app.state.overload_rejections = rejected
        # added last = outermost: refused before the body is even read
        app.add_middleware(ConcurrencyLimitMiddleware, limit=max_inflight,
                           retry_after=retry_after, on_reject=rejected.inc)
    app.add_middleware(MetricsMiddleware, registry=reg)

    @app.get("/metrics", include_in_schema=False)
    async def _metrics():
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)


def allowed_methods(app, scope) -> list[str]:
    """Every method some route serves at this request's path (for a 405's Allow)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in app.router.routes:
        for m in getattr(route, "methods", None) or ():
            match, _ = route.matches({**scope, "method": m})
            if match == Match.FULL:
                methods.add(m)
    return sorted(methods)


def json_response(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status,
                    media_type="application/json")
