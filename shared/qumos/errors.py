"""QuMoS error hierarchy: every error QuMoS raises on purpose, in one tree.

    QumosError
    ├── DesignError          an invalid model or fragment description (names the field)
    ├── ArtifactError        a corrupted, mismatched or missing artifact
    ├── DatasetError         unknown dataset/task, or data files missing
    ├── AttackError          an attack that cannot run (e.g. not a provider directory)
    ├── StoreError           a provider data directory that cannot be used
    ├── StackError           a local stack (`qumos.localstack`) that cannot start or answer
    ├── SettingsError        a service's missing or invalid settings (names the variable)
    └── ServiceError         an HTTP error: raised by a service's handlers (status, type,
        └── BodyTooLarge     message, field -> the JSON error body) and by the clients when
                             a service answered with one (also url and the body received)

Services turn them into JSON error responses (`qumos.web`: ServiceError -> its status,
anything else -> 500); the CLI prints them without a traceback. No imports: every layer
can raise them.
"""

from __future__ import annotations

from typing import Any


class QumosError(Exception):
    """Base class of every error QuMoS raises on purpose."""


class DesignError(QumosError, ValueError):
    """An invalid design: the message names the field and what is allowed."""


class ArtifactError(QumosError):
    """An artifact that cannot be loaded: the message says which file and why."""


class DatasetError(QumosError):
    """An unknown dataset or task, or data files that are missing."""


class AttackError(QumosError):
    """An attack that cannot run as asked."""


class StoreError(QumosError):
    """A provider directory that cannot be used (names the path and why)."""


class StackError(QumosError):
    """A local stack of services that cannot start or does not become ready."""


class SettingsError(QumosError):
    """Missing or invalid settings: names the environment variable."""


class ServiceError(QumosError):
    """An HTTP error with its JSON body `{"error": {"type", "message", "field"}}`.

    A service's handler raises `ServiceError(404, "not_found", "model: ...", "model")`;
    a client raises `ServiceError.from_response(status, body, url)` for an error answer,
    with `body` the decoded body as received (a dict, or the text)."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        field: str | None = None,
        headers: dict | None = None,
        *,
        url: str | None = None,
        body: Any = None,
    ):
        self.status, self.type, self.message, self.field = status, type_, message, field
        self.headers, self.url, self.body = headers, url, body
        super().__init__(f"{url}: HTTP {status}: {message}" if url else message)

    @property
    def status_code(self) -> int:
        return self.status

    @classmethod
    def from_response(cls, status: int, body: Any, url: str) -> ServiceError:
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):  # {"error": {"type", "message", "field"}}
            return cls(
                status,
                str(err.get("type", "http_error")),
                str(err.get("message")),
                err.get("field"),
                url=url,
                body=body,
            )
        message = err if isinstance(err, str) else str(body)  # /v2: {"error": "..."}
        return cls(status, "http_error", message, url=url, body=body)


class BodyTooLarge(ServiceError):
    def __init__(self, limit: int):
        super().__init__(
            413,
            "body_too_large",
            f"body: request body exceeds {limit} bytes; allowed: at most {limit}",
            "body",
        )
