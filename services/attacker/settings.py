"""The attacker's settings: environment variables QUMOS_ATTACKER_<FIELD>."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AttackerSettings(BaseSettings):
    """Environment variables QUMOS_ATTACKER_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="QUMOS_ATTACKER_", extra="ignore")

    breached_dir: Path = Field(description="the breached provider's data directory (read only)")
    coalition_dirs: list[Path] = Field(
        default_factory=list,
        description="more breached "
        "providers' data directories (read only), for "
        "`coalition` jobs; JSON list",
    )
    data_dir: Path = Field(description="job records persist here")
    admin_token_file: Path = Field(description="token for submitting attack jobs")
    max_pending: int = Field(
        8, ge=1, le=1000, description="jobs queued or running before a submission gets 503"
    )
    orchestrator_url: str | None = Field(None, description="public API, for query/fidelity")
    api_key_file: Path | None = Field(
        None,
        description="the attacker's client API key for "
        "the public API (read at each job; never logged)",
    )
    workers: int = Field(1, ge=1, le=8, description="jobs run concurrently")
    dataset_dir: Path = Field(Path("data"), description="where full MNIST files live")
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    predict_batch: int = Field(256, ge=1, le=1024, description="rows per public predict call")
