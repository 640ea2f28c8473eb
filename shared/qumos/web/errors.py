"""JSON error responses: the one body shape per protocol, the exception handlers every
service installs, and the documented error statuses (OpenAPI)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from qumos.errors import ServiceError
from qumos.wire import ErrorBody, OipErrorBody, describe_validation_error
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("qumos.service")


def is_oip_path(path: str | None) -> bool:
    """Paths of the Open Inference Protocol v2, whose errors are {"error": "<string>"}."""
    return path is not None and (path == "/v2" or path.startswith("/v2/"))


def error_json(
    status: int,
    type_: str,
    message: str,
    field: str | None = None,
    headers: dict | None = None,
    path: str | None = None,
) -> JSONResponse:
    """The error body; `path` (the request's) picks the protocol's shape under /v2."""
    if is_oip_path(path):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    err = {"type": type_, "message": message}
    if field is not None:
        err["field"] = field
    return JSONResponse({"error": err}, status_code=status, headers=headers)


def internal_error(scope, exc: Exception) -> JSONResponse:
    """500 "internal" for an exception nobody raised on purpose: logged with its
    traceback, never shown to the client."""
    log.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
    return error_json(
        500,
        "internal",
        f"internal error ({type(exc).__name__}); the service is still up",
        path=scope.get("path"),
    )


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


async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_json(
        exc.status, exc.type, exc.message, exc.field, headers=exc.headers, path=request.url.path
    )


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own HTTPException (404 no route, 405, a handler's)."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = getattr(exc, "headers", None)
    if exc.status_code == 404 and msg == "Not Found":
        msg = f"path: {request.url.path} is not an endpoint of this service"
    if exc.status_code == 405:  # Starlette names only the first matching route's methods
        allow = allowed_methods(request.app, request.scope)
        headers = {**(headers or {}), "Allow": ", ".join(allow)}
        msg = (
            f"method: {request.method} is not allowed on {request.url.path}; "
            f"allowed: {', '.join(allow)}"
        )
    return error_json(exc.status_code, kind, msg, headers=headers, path=request.url.path)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    field, message = describe_validation_error(exc)
    return error_json(422, "validation_error", message, field, path=request.url.path)


async def unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    return internal_error(request.scope, exc)


def install_error_handlers(app: FastAPI) -> None:
    # (starlette types a handler as taking any Exception; each of these takes its own)
    app.add_exception_handler(ServiceError, service_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unhandled_error)


# Responses every documented endpoint may give (for the OpenAPI schema).
ERROR_DESCRIPTIONS = {
    401: "no credentials",
    403: "wrong credentials",
    404: "unknown model, fragment or job",
    409: "the service cannot do this now (e.g. the attacker holds no breached provider)",
    413: "body or batch too large",
    422: "invalid input (names the field)",
    500: "internal error",
    502: "a provider sent a bad or tampered answer",
    503: "overloaded or a provider is unavailable (Retry-After)",
    504: "a provider did not answer in time",
    507: "the data directory cannot be written",
    429: "over the API key's quota (Retry-After, RateLimit-* headers)",
}


def error_responses(*codes: int, oip: bool = False) -> dict:
    """`responses=` for a route: the JSON error body under each status (`oip`: the Open
    Inference Protocol's {"error": "<string>"}, for /v2 routes)."""
    model = OipErrorBody if oip else ErrorBody
    return {c: {"model": model, "description": ERROR_DESCRIPTIONS[c]} for c in codes}
