"""The provider's settings: environment variables QUMOS_PROVIDER_<FIELD>."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from qumos.quantum import FAKE_BACKENDS


class ProviderSettings(BaseSettings):
    """Environment variables QUMOS_PROVIDER_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="QUMOS_PROVIDER_", extra="ignore")

    name: str = Field(description="this provider's name, e.g. provider-a")
    data_dir: Path = Field(description="the provider's own data directory")
    token_file: Path = Field(description="file holding the orchestrator's bearer token")
    device: str | None = Field(None, description=f"fake IBM backend, one of {FAKE_BACKENDS}")
    depol_1q: float = Field(0.0, ge=0.0, le=1.0, description="1-qubit depolarizing rate")
    depol_2q: float = Field(0.0, ge=0.0, le=1.0, description="2-qubit depolarizing rate")
    readout_error: float = Field(0.0, ge=0.0, le=0.5, description="symmetric readout error")
    max_batch: int = Field(1024, ge=1, description="most rows per execute call")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request size limit")
    workers: int = Field(2, ge=1, description="concurrent simulator calls")
    inline_rows: int = Field(
        16,
        ge=0,
        le=1024,
        description="exact batches of at most this "
        "many rows on an ideal device run on the event loop (a few ms), "
        "skipping the ~0.6 ms hand-off to a worker thread; 0 = never",
    )
    max_inflight: int = Field(64, ge=1, description="requests in flight before 503")
    access_log_required: bool = Field(
        False, description="refuse (507) an answer whose access-log line cannot be written"
    )
