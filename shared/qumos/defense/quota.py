"""Query quotas per key: images per fixed window and in total, persisted.

`QuotaBook.charge` decides a request (all its images or none) and returns the
`RateLimit-*` headers (IETF draft "RateLimit header fields": limit, remaining, reset) and,
when refused, `Retry-After`. Counters live in `<data_dir>/quota.json`, written atomically
by `flush` (the orchestrator flushes when dirty, every QUOTA_FLUSH_S and at shutdown): a
restart keeps them; a crash loses at most the last flush interval, never the file.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Quota(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images_per_window: int | None = Field(None, ge=1, description="None: no window limit")
    window_s: float = Field(60.0, gt=0, le=366 * 86400)
    images_total: int | None = Field(None, ge=1, description="None: no total limit")

    @model_validator(mode="after")
    def _check(self) -> Quota:
        if not math.isfinite(self.window_s):
            raise ValueError("window_s must be finite")
        return self


class Usage(BaseModel):
    window_start: float = 0.0
    in_window: int = 0
    total: int = 0


class UsageFile(BaseModel):
    usage: dict[str, Usage] = Field(default_factory=dict)


@dataclass
class Decision:
    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    message: str = ""


class QuotaBook:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.usage: dict[str, Usage] = {}
        self.dirty = False

    def load(self) -> None:
        if not self.path.is_file():
            return
        try:
            self.usage = UsageFile.model_validate_json(self.path.read_bytes()).usage
        except ValidationError as e:
            raise ValueError(f"{self.path}: not a quota file ({str(e).splitlines()[0]})") from None

    def flush(self) -> None:
        from qumos.files import atomic_write

        if not self.dirty:
            return
        self.dirty = False
        try:
            atomic_write(self.path, UsageFile(usage=self.usage).model_dump_json().encode())
        except OSError:
            self.dirty = True
            raise

    def charge(self, kid: str, quota: Quota, n: int, now: float | None = None) -> Decision:
        """Count `n` images against the key, or refuse them all (429 material). Headers:
        the binding limit (the one with less left) as RateLimit-Limit/-Remaining/-Reset."""
        now = time.time() if now is None else now
        u = self.usage.setdefault(kid, Usage(window_start=now))
        if now - u.window_start >= quota.window_s:
            u.window_start, u.in_window = now, 0
        reset = max(0.0, u.window_start + quota.window_s - now)
        inf = float("inf")
        win_left = (
            quota.images_per_window - u.in_window if quota.images_per_window is not None else inf
        )
        tot_left = quota.images_total - u.total if quota.images_total is not None else inf
        allowed = n <= win_left and n <= tot_left
        if allowed:
            u.in_window += n
            u.total += n
            self.dirty = True
            win_left, tot_left = win_left - n, tot_left - n
        headers: dict[str, str] = {}
        if quota.images_per_window is not None or quota.images_total is not None:
            by_window = win_left <= tot_left
            headers = {
                "RateLimit-Limit": str(
                    quota.images_per_window if by_window else quota.images_total
                ),
                "RateLimit-Remaining": str(int(max(0, min(win_left, tot_left)))),
                "RateLimit-Reset": str(math.ceil(reset) if by_window else 0),
            }
            if quota.images_per_window is not None:
                headers["RateLimit-Policy"] = f"{quota.images_per_window};w={quota.window_s:g}"
        if allowed:
            return Decision(True, headers)
        if n > tot_left:
            msg = (
                f"quota: the key's total of {quota.images_total} images is used up "
                f"({u.total} used; this request has {n}); ask the admin for a new quota"
            )
        elif n > (quota.images_per_window or 0):
            msg = (
                f"quota: {n} images in one request; this key may send at most "
                f"{quota.images_per_window} per {quota.window_s:g} s window"
            )
        else:
            msg = (
                f"quota: {u.in_window} of {quota.images_per_window} images used in this "
                f"{quota.window_s:g} s window; this request has {n}; retry in "
                f"{math.ceil(reset)} s"
            )
            headers["Retry-After"] = str(max(1, math.ceil(reset)))
        return Decision(False, headers, msg)


__all__ = ["Decision", "Quota", "QuotaBook", "Usage"]
