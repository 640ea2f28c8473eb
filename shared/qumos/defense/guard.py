"""The orchestrator's gate for every prediction: key, quota, throttle/block, monitor.

    guard.admit(authorization, model, n_images) -> Client   (or Refusal: 401/403/429)
    guard.observe(client, model, raw, classes)              (PRADA; Refusal 403 under
                                                             `block` when this flags it)

No web framework here: the routes turn a `Refusal` into their JSON error. Nothing here
logs or returns a key's secret: logs and metrics name keys by id (`qk_<id>`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from qumos.defense.keys import KeyProblem, KeyRecord, KeyStore
from qumos.defense.monitor import Monitor, MonitorConfig
from qumos.defense.quota import Quota, QuotaBook

log = logging.getLogger("qumos.orchestrator.defense")
ANONYMOUS = "anonymous"


class Refusal(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


@dataclass
class Client:
    id: str  # "qk_<id>" or "anonymous"
    record: KeyRecord | None
    headers: dict[str, str] = field(default_factory=dict)  # RateLimit-* for the answer
    throttle_s: float = 0.0


class Guard:
    def __init__(
        self,
        data_dir: Path,
        allow_anonymous: bool = False,
        monitor_action: str = "log",
        monitor: MonitorConfig | None = None,
        throttle_s: float = 1.0,
        anonymous_quota: Quota | None = None,
        counters: dict | None = None,
    ):
        self.keys = KeyStore(Path(data_dir) / "keys.json")
        self.quota = QuotaBook(Path(data_dir) / "quota.json")
        self.allow_anonymous, self.monitor_action = allow_anonymous, monitor_action
        self.monitor = Monitor(monitor) if monitor_action != "off" else None
        self.throttle_s = throttle_s
        self.anonymous_quota = anonymous_quota or Quota()
        self.counters = counters or {}

    def load(self) -> None:
        self.keys.load()
        self.quota.load()

    def _count(self, name: str, n: float = 1, **labels) -> None:
        c = self.counters.get(name)
        if c is not None:
            c.labels(**labels).inc(n)

    def admit(self, authorization: str | None, model: str, n_images: int) -> Client:
        if not authorization and self.allow_anonymous:
            client = Client(ANONYMOUS, None)
            quota = self.anonymous_quota
        else:
            try:
                rec = self.keys.verify(authorization)
            except KeyProblem as e:
                self._count("refused", key="(invalid)", reason=e.kind)
                raise Refusal(
                    e.status,
                    e.kind,
                    e.message,
                    {"WWW-Authenticate": "Bearer"} if e.status == 401 else None,
                ) from None
            client = Client(f"qk_{rec.id}", rec)
            quota = rec.quota
            if rec.flagged is not None:
                if self.monitor_action == "block":
                    self._count("refused", key=client.id, reason="blocked")
                    raise Refusal(
                        403,
                        "key_blocked",
                        f"authorization: the API key "
                        f"{client.id} is blocked: the extraction monitor flagged it "
                        f"({rec.flagged.get('reason', '')})",
                    )
                if self.monitor_action == "throttle":
                    client.throttle_s = self.throttle_s
        d = self.quota.charge(client.id, quota, n_images)
        if not d.allowed:
            self._count("refused", key=client.id, reason="quota")
            raise Refusal(429, "quota_exceeded", d.message, d.headers)
        client.headers = d.headers
        self._count("images", n_images, key=client.id)
        return client

    def observe(self, client: Client, model: str, raw: np.ndarray, classes: np.ndarray) -> None:
        if self.monitor is None:
            return
        if not self.monitor.observe(client.id, model, raw, classes):
            return
        st = self.monitor.state(client.id, model)
        assert st is not None and st.w is not None  # observe() just flagged it
        info = {
            "time": time.time(),
            "model": model,
            "queries": st.flagged_at,
            "w": round(st.w, 4),
            "reason": f"PRADA: Shapiro-Wilk W {st.w:.3f} < {self.monitor.cfg.delta} "
            f"after {st.flagged_at} queries on {model}",
        }
        log.warning(
            "extraction monitor flagged key %s on model %s after %d queries "
            "(Shapiro-Wilk W %.3f < %.3g); action %s",
            client.id,
            model,
            st.flagged_at,
            st.w,
            self.monitor.cfg.delta,
            self.monitor_action,
        )
        self._count("flagged", key=client.id)
        if client.record is not None:
            try:
                self.keys.flag(client.record.id, info)
            except OSError as e:
                log.error("could not persist the flag of key %s: %s", client.id, e.strerror)
        if self.monitor_action == "block" and client.record is not None:
            raise Refusal(
                403,
                "key_blocked",
                f"authorization: the API key {client.id} is "
                f"blocked: the extraction monitor flagged it ({info['reason']})",
            )

    def flagged(self) -> list[dict]:
        return [r.public() for r in self.keys.keys.values() if r.flagged is not None]


__all__ = ["ANONYMOUS", "Client", "Guard", "Refusal"]
