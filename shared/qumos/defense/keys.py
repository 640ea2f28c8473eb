"""Client API keys: `qk_<id>_<secret>`, stored only as salted SHA-256 hashes.

The store is one JSON file (`<data_dir>/keys.json`) written atomically (temp file,
fsync, rename): a crash mid-write leaves the previous store. The key itself is shown
once, at creation; afterwards only its id (`qk_<id>`, public, what logs and metrics
name) is known to the orchestrator. Keys are 256-bit random secrets, so one salted hash
(not a slow password hash) is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from qumos.defense.quota import Quota

KEY_RE = re.compile(r"qk_([0-9a-f]{12})_([A-Za-z0-9_-]{32,64})")
KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


class KeyProblem(Exception):
    """A request's key is missing, malformed, unknown, revoked or blocked."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    salt: str
    hash: str
    created: float
    revoked: float | None = None
    quota: Quota = Field(default_factory=Quota)
    flagged: dict | None = Field(None, description="extraction monitor: when and why")

    def public(self) -> dict:
        """What `keys list` shows: never the salt or the hash."""
        return {
            "id": f"qk_{self.id}",
            "name": self.name,
            "created": self.created,
            "revoked": self.revoked,
            "quota": self.quota.model_dump(),
            "flagged": self.flagged,
        }


class KeyFile(BaseModel):
    keys: dict[str, KeyRecord] = Field(default_factory=dict)


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def key_id(text: str) -> str:
    """'qk_<id>' or '<id>' -> '<id>'; ValueError otherwise."""
    m = re.fullmatch(r"(?:qk_)?([0-9a-f]{12})", text.strip())
    if not m:
        raise ValueError(
            f"key id: {text[:20]!r} is not a key id (qk_ and 12 hex digits, "
            "as `qumos keys list` shows)"
        )
    return m.group(1)


def name_problem(name: str) -> str | None:
    if isinstance(name, str) and KEY_NAME_RE.fullmatch(name):
        return None
    return (
        f"{str(name)[:40]!r} is not a key name; allowed: 1 to 64 letters, digits, '_', "
        "'.', '@' or '-', starting with a letter or digit"
    )


class KeyStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.keys: dict[str, KeyRecord] = {}

    def load(self) -> None:
        """Raises ValueError naming the file when it is not a key store."""
        if not self.path.is_file():
            return
        try:
            self.keys = KeyFile.model_validate_json(self.path.read_bytes()).keys
        except ValidationError as e:
            raise ValueError(f"{self.path}: not a key store ({str(e).splitlines()[0]})") from None

    def save(self) -> None:
        from qumos.files import atomic_write

        atomic_write(self.path, KeyFile(keys=self.keys).model_dump_json(indent=1).encode())
        self.path.chmod(0o600)

    def create(self, name: str, quota: Quota | None = None) -> tuple[str, KeyRecord]:
        """(the key, shown once; its record). Saved before returning."""
        problem = name_problem(name)
        if problem:
            raise ValueError(f"name: {problem}")
        kid = secrets.token_hex(6)
        while kid in self.keys:
            kid = secrets.token_hex(6)
        secret, salt = secrets.token_urlsafe(32), secrets.token_hex(16)
        rec = KeyRecord(
            id=kid,
            name=name,
            salt=salt,
            hash=_hash(salt, secret),
            created=time.time(),
            quota=quota or Quota(),
        )
        self.keys[kid] = rec
        try:
            self.save()
        except OSError:
            del self.keys[kid]
            raise
        return f"qk_{kid}_{secret}", rec

    def revoke(self, kid: str) -> KeyRecord:
        rec = self.get(kid)
        if rec.revoked is None:
            old = rec.revoked
            rec.revoked = time.time()
            try:
                self.save()
            except OSError:
                rec.revoked = old
                raise
        return rec

    def get(self, kid: str) -> KeyRecord:
        rec = self.keys.get(kid)
        if rec is None:
            raise KeyError(f"key: qk_{kid} is not a key of this orchestrator")
        return rec

    def flag(self, kid: str, info: dict) -> None:
        rec = self.keys.get(kid)
        if rec is not None and rec.flagged is None:
            rec.flagged = info
            self.save()

    def verify(self, authorization: str | None) -> KeyRecord:
        """The record of the request's key; KeyProblem (401/403) naming what is wrong.
        The key's secret part appears in no message."""
        if not authorization:
            raise KeyProblem(
                401,
                "unauthorized",
                "authorization: missing; send "
                "'Authorization: Bearer <API key>' (the admin creates keys "
                "with `qumos keys create`)",
            )
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise KeyProblem(401, "unauthorized", "authorization: expected 'Bearer <API key>'")
        m = KEY_RE.fullmatch(value.strip())
        if not m:
            raise KeyProblem(
                401,
                "unauthorized",
                "authorization: the bearer token is not an API key (qk_<id>_<secret>)",
            )
        rec = self.keys.get(m.group(1))
        if rec is None or not hmac.compare_digest(_hash(rec.salt, m.group(2)), rec.hash):
            raise KeyProblem(401, "unauthorized", "authorization: unknown API key")
        if rec.revoked is not None:
            raise KeyProblem(
                403,
                "key_revoked",
                f"authorization: the API key qk_{rec.id} ({rec.name}) was revoked",
            )
        return rec


__all__ = ["KeyProblem", "KeyRecord", "KeyStore", "key_id"]
