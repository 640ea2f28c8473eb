"""The services' web layer (FastAPI/Starlette; the services only, never a client).

    qumos.web.app          install_common, check_bearer, parse_body, json_response, ...
    qumos.web.errors       the JSON error bodies and the exception handlers
    qumos.web.middleware   body limit, in-flight limit, request metrics

What a request can end in. Error bodies are `{"error": {"type", "message", "field"?}}`,
except under /v2 (the Open Inference Protocol) where they are the protocol's
`{"error": "<message>"}` (the message still starts with the field). The exception
classes are `qumos.errors`' one tree (QumosError: DesignError, ArtifactError,
DatasetError, AttackError, StoreError, StackError, SettingsError, ServiceError >
BodyTooLarge); here is how each reaches the client:

    QumosError
    ├── ServiceError        raised by handlers: its status, type, message, field, headers
    │   └── BodyTooLarge    413, raised by the body-limit middleware (Content-Length or
    │                       the bytes received)
    ├── SettingsError       at start-up only: the service does not start (names the variable)
    └── (the others)        a handler turns them into a ServiceError naming the field
    RequestValidationError  422 "validation_error" naming the field (qumos.wire's formatter)
    HTTPException           its status: 404 no such path, 405 (with Allow), ...
    overload                503 "overloaded" + Retry-After, never queued (in-flight limit)
    any other exception     500 "internal" (logged with its traceback, never sent)

Every route is an ordinary FastAPI route (docs/performance.md: a hand-written fast path
for the prediction routes gained no measurable latency and was removed).
"""

from qumos.web.app import (
    add_health_routes,
    bearer,
    check_bearer,
    document_request_bodies,
    freeze_startup_heap,
    install_common,
    json_response,
    parse_body,
)
from qumos.web.errors import error_responses

__all__ = [
    "add_health_routes",
    "bearer",
    "check_bearer",
    "document_request_bodies",
    "error_responses",
    "freeze_startup_heap",
    "install_common",
    "json_response",
    "parse_body",
]
