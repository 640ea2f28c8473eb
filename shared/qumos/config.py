"""Settings shared by the services and the CLI: the provider list, token files, and
pydantic-settings classes loaded from the environment. Errors are `SettingsError`
naming the variable (or the CLI option) at fault. Imports pydantic only."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from qumos.errors import SettingsError

MIN_TOKEN_CHARS = 16


def parse_providers(text: str) -> dict[str, str]:
    """'name=http://host:port,name=...' -> {name: url without a trailing '/'};
    ValueError saying which part is wrong."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, url = part.partition("=")
        if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
            raise ValueError(f"{part!r} is not name=http://host:port")
        out[name.strip()] = url.strip().rstrip("/")
    if not out:
        raise ValueError("no providers; expected name=url,name=url,...")
    return out


def read_token_file(path: Path | str, var: str) -> str:
    """The token in `path` (whitespace stripped); SettingsError naming `var` when the file
    cannot be read or holds fewer than 16 characters."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise SettingsError(f"{var}: cannot read token file {path} ({e.strerror})") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise SettingsError(
            f"{var}: token file {path} holds no token of at least {MIN_TOKEN_CHARS} characters"
        )
    return token


def load_settings(cls, settings=None):
    """Build pydantic-settings `cls` from the environment (or return `settings` when
    given); SettingsError names every variable at fault."""
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
