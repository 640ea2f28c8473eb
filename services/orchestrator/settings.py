"""The orchestrator's settings: environment variables QUMOS_ORCH_<FIELD>."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from qumos.config import parse_providers


class OrchestratorSettings(BaseSettings):
    """Environment variables QUMOS_ORCH_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="QUMOS_ORCH_", extra="ignore")

    data_dir: Path = Field(description="registered models persist here")
    providers: str = Field(description="name=url,name=url,... of every provider")
    tokens_dir: Path = Field(description="one file per provider, named after it, with its token")
    admin_token_file: Path = Field(description="token for registering models")
    timeout_s: float = Field(30.0, gt=0, description="per provider call")
    retries: int = Field(2, ge=0, le=10, description="retries of a failed provider call")
    max_batch: int = Field(1024, ge=1)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_inflight: int = Field(64, ge=1, description="requests in flight before 503")
    canaries_per_call: int = Field(
        4,
        ge=0,
        le=256,
        description="integrity canaries mixed into each provider call (when registered)",
    )
    provider_max_batch: int = Field(
        1024,
        ge=2,
        description="most rows per provider call, canaries included (larger batches are split)",
    )
    max_retry_after_s: float = Field(2.0, ge=0, description="cap on a provider's Retry-After")
    http_transport: Literal["qumos", "httpcore"] = Field(
        "qumos",
        description="what the pooled httpx.AsyncClient sends through: "
        "qumos.http11 (default, least CPU per call) or httpx's own httpcore",
    )
    # ----- defences (qumos.defense, docs/defenses.md) -----
    allow_anonymous: bool = Field(False, description="serve predictions without an API key")
    anonymous_images_per_window: int | None = Field(None, ge=1, description="anonymous quota")
    anonymous_window_s: float = Field(60.0, gt=0, le=366 * 86400)
    monitor: Literal["off", "log", "throttle", "block"] = Field(
        "log", description="extraction monitor (PRADA) action when it flags a key"
    )
    monitor_delta: float = Field(
        0.85,
        gt=0,
        lt=1,
        description="flag when Shapiro-Wilk W of the key's minimum distances < delta",
    )
    monitor_min_queries: int = Field(100, ge=20, le=100_000)
    monitor_window: int = Field(2000, ge=20, le=100_000)
    monitor_throttle_s: float = Field(
        1.0, ge=0, le=60, description="delay per request of a flagged key (action throttle)"
    )
    batch_window_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="cross-client dynamic batching: collect requests this long (0: off)",
    )
    batch_max_rows: int = Field(256, ge=1, le=100_000, description="rows per batch")
    batch_max_inflight: int = Field(
        2,
        ge=1,
        le=64,
        description="batches of a model in flight at once; later requests keep collecting",
    )
    dedup_rows: bool = Field(
        True,
        description="exact mode: identical rows of a provider "
        "call are sent once, in a random order (an insider cannot mark "
        "its rows by repeating them)",
    )
    quota_flush_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="quota counters are written at most this often (and at shutdown)",
    )

    @model_validator(mode="after")
    def _canary_room(self):
        if self.canaries_per_call >= self.provider_max_batch:
            raise ValueError(
                f"canaries_per_call ({self.canaries_per_call}) must be below "
                f"provider_max_batch ({self.provider_max_batch})"
            )
        return self

    @field_validator("providers")
    @classmethod
    def _providers(cls, v: str) -> str:
        parse_providers(v)
        return v

    def provider_urls(self) -> dict[str, str]:
        return parse_providers(self.providers)
