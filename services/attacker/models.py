"""The attacker service's wire contract: an attack request and a job record."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from qumos.spec import Design

MAX_SEEDS = 10
MAX_EPOCHS = 200
MAX_RESTARTS = 64
MAX_QUERIES = 5000
SERVICE_PROFILES = ("breach", "breach+queries", "queries", "coalition")
MAX_SEED = 2**32 - 1  # numpy and torch seeds


class BudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fraction: float = Field(0.05, gt=0, le=1, description="labelled fraction of the train set")
    epochs: int = Field(75, ge=1, le=MAX_EPOCHS, description="training steps per restart")
    restarts: int = Field(24, ge=1, le=MAX_RESTARTS, description="restarts, learning rates cycled")
    queries: int = Field(
        100,
        ge=1,
        le=MAX_QUERIES,
        description="own images sent through the public API (breach+queries, queries)",
    )


class AttackRequest(BaseModel):
    """POST /v1/attacks. The attacker's knowledge of the task (dataset, task, the
    victim's split seed) is given here; the test split of that task scores the theft."""

    model_config = ConfigDict(extra="forbid")
    provider: str | None = Field(None, description="must be the breached (mounted) provider")
    model: str | None = Field(None, description="which model, if the provider hosts several")
    profile: str = Field("breach", description="breach, breach+queries, queries or coalition")
    coalition: list[str] = Field(
        default_factory=list,
        description="coalition: the providers breached together (mounted ones)",
    )
    strategies: list[str] = Field(
        default_factory=list,
        description="a subset of the profile's strategies (default: all of them)",
    )
    budget: BudgetIn = Field(default_factory=BudgetIn)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(
        default_factory=lambda: [0, 1, 2],
        description=f"1 to {MAX_SEEDS} distinct seeds, each 0 to {MAX_SEED}",
    )
    know_architecture: bool = Field(True, description="Kerckhoffs: needs `design`")
    design: Design | None = Field(None, description="the victim's design (Kerckhoffs)")
    dataset: str = "digits"
    task: int = 4
    split_seed: int = Field(0, ge=0, description="the victim's split seed")
    api_key: str | None = Field(
        None,
        max_length=200,
        description="client API key for the "
        "orchestrator's public API (else QUMOS_ATTACKER_API_KEY_FILE); "
        "kept in memory for the job only, never stored or logged",
    )
    victim_acc: float | None = Field(
        None,
        ge=0,
        le=1,
        description="if known; else measured through the orchestrator's public API when set",
    )

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str) -> str:
        if v not in SERVICE_PROFILES:
            raise ValueError(f"unknown profile {v!r}; allowed: {list(SERVICE_PROFILES)}")
        return v

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, v: list[str], info: ValidationInfo) -> list[str]:
        from qumos.attack.strategies import strategies_of

        profile = info.data.get("profile")
        if profile is None:
            return v  # the profile itself is invalid (reported on its own)
        allowed = strategies_of(profile)
        for i, s in enumerate(v):
            if s not in allowed:
                raise ValueError(
                    f"strategies[{i}] is {s!r}, not a strategy of profile "
                    f"{profile}; allowed: {list(allowed)}"
                )
        return list(dict.fromkeys(v))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not 1 <= len(v) <= MAX_SEEDS:
            raise ValueError(f"has {len(v)} seeds; allowed: 1 to {MAX_SEEDS}")
        if len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError("seeds must be distinct non-negative integers")
        return v


class Job(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "interrupted"]
    provider: str
    request: dict
    progress: dict = Field(default_factory=dict)
    results: dict | None = None
    error: str | None = None
    created: float
    started: float | None = None
    finished: float | None = None
