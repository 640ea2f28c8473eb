"""What every service's app is built with: `install_common` (error handlers, limits,
metrics), bearer-token checks, body parsing, JSON responses, the OpenAPI documentation of
self-parsed bodies, the health routes, and the start-up heap freeze.

Credentials: tokens come from files (`qumos.config.read_token_file`), are compared with
`hmac.compare_digest` and never appear in a log line or an error message.
"""

from __future__ import annotations

import gc
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from qumos.errors import ServiceError
from qumos.web.errors import error_responses, install_error_handlers
from qumos.web.middleware import (
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    InternalErrorMiddleware,
    MetricsMiddleware,
    QuietHealthChecks,
)
from qumos.wire import describe_validation_error

M = TypeVar("M", bound=BaseModel)


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


def check_bearer(request: Request, token: str) -> None:
    """401 without credentials, 403 with wrong ones (constant-time comparison)."""
    auth = request.headers.get("authorization")
    if not auth:
        raise ServiceError(
            401,
            "unauthorized",
            "authorization: missing; send 'Authorization: Bearer <token>'",
            "authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        value.strip().encode(), token.encode()
    ):
        raise ServiceError(
            403,
            "forbidden",
            "authorization: the bearer token is not valid for this service",
            "authorization",
        )


def bearer(token: Callable[[], str]):
    """A route dependency (`dependencies=[Depends(bearer(...))]`): `check_bearer` with
    the token `token()` gives. Async, so FastAPI runs it on the event loop, not in a
    worker thread (a ~0.5 ms hand-off)."""

    async def check(request: Request) -> None:
        check_bearer(request, token())

    return check


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


def document_request_bodies(app: FastAPI, bodies: dict[tuple[str, str], type[BaseModel]]) -> None:
    """Routes parse their bodies themselves (`parse_body`, for clear errors on any content
    type); this puts those request models into the OpenAPI schema, so clients and
    schemathesis see the contract. `bodies`: {(path, method): model}."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema(
            [(m, "validation") for m in bodies.values()],
            ref_template="#/components/schemas/{model}",
        )
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, d in defs.get("$defs", {}).items():
            comps.setdefault(name, d)
        for (path, method), model in bodies.items():
            op = schema["paths"][path][method]
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}
                    }
                },
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_common(
    app: FastAPI,
    max_body_bytes: int,
    registry=None,
    max_inflight: int | None = None,
    retry_after: int = 1,
) -> None:
    """JSON error handlers, the body limit, the in-flight limit and Prometheus /metrics."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

    install_error_handlers(app)
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QuietHealthChecks) for f in access.filters):
        access.addFilter(QuietHealthChecks())
    app.add_middleware(InternalErrorMiddleware)  # first = innermost
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    reg = registry if registry is not None else CollectorRegistry()
    app.state.metrics_registry = reg
    if max_inflight is not None:
        rejected = Counter(
            "qumos_overload_rejections",
            "requests refused with 503 because the in-flight limit was reached",
            registry=reg,
        )
        app.state.overload_rejections = rejected
        # added last = outermost: refused before the body is even read
        app.add_middleware(
            ConcurrencyLimitMiddleware,
            limit=max_inflight,
            retry_after=retry_after,
            on_reject=rejected.inc,
        )
    app.add_middleware(MetricsMiddleware, registry=reg)

    @app.get("/metrics", include_in_schema=False)
    async def _metrics():
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)


def add_health_routes(app: FastAPI, readiness: Callable[[], Awaitable[dict]], **identity) -> None:
    """GET /healthz (the process answers: {"status": "ok", **identity}) and GET /readyz
    (`readiness()`'s body, or its ServiceError: 503 while the service cannot serve)."""

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", **identity}

    @app.get("/readyz", responses=error_responses(503))
    async def readyz():
        return await readiness()


def json_response(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")
