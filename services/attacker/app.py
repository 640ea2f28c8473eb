"""The attacker: runs attack jobs against one breached provider's holdings.

Run:  QUMOS_ATTACKER_BREACHED_DIR=runs/provider-b QUMOS_ATTACKER_DATA_DIR=runs/attacker \
      QUMOS_ATTACKER_ADMIN_TOKEN_FILE=runs/attacker_token \
      [QUMOS_ATTACKER_ORCHESTRATOR_URL=http://127.0.0.1:8100] \
      uvicorn --factory services.attacker.app:create_app --port 8200

Endpoints:
    POST /v1/attacks          AttackRequest -> 202 {"id", "status", ...} (admin token;
                              503 + Retry-After when MAX_PENDING jobs are queued or running)
    GET  /v1/attacks          every job (without per-run details)
    GET  /v1/attacks/{id}     status, progress {strategy, seed, restart, epoch, done, total},
                              results (qumos.attack.run_attack's report: the references
                              and S, per strategy accuracy and fidelity, A_j, leak_j,
                              theft ratio, security), error

A job names its attacker profile: `breach` (the mounted provider's fragment and access
log), `breach+queries` (also `budget.queries` of its own images through the orchestrator's
public API, their rows attributed in the mounted log by timing and content), `queries`
(no breach: the reference) or `coalition` (the providers named in `coalition`, each of
them BREACHED_DIR or one of COALITION_DIRS: a deployment that mounts more breached
providers; without them a coalition job is a 422).
    GET  /healthz, /readyz (503 while BREACHED_DIR is not a provider's data directory), /metrics

The breached directory (BREACHED_DIR, read-only in docker) is only ever read, with
`qumos.attack.breach`, once per job. Jobs run in worker threads (WORKERS of them), never
on the event loop. Every job is a JSON file in DATA_DIR/jobs/, rewritten atomically on
each change; at startup the files are reloaded and a job that was queued or running when
the service stopped is marked "interrupted" (resubmit it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import FastAPI, Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from qumos.artifact import atomic_write
from qumos.errors import QumosError
from qumos.spec import Design
from qumos.webcommon import (
    ServiceError,
    check_bearer,
    document_request_bodies,
    error_responses,
    install_common,
    load_settings,
    parse_body,
    read_token_file,
)

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("qumos.attacker")

MAX_SEEDS = 10
MAX_EPOCHS = 200
MAX_RESTARTS = 64
MAX_QUERIES = 5000
SERVICE_PROFILES = ("breach", "breach+queries", "queries", "coalition")
MAX_SEED = 2**32 - 1  # numpy and torch seeds
QUEUE_RETRY_AFTER_S = 30  # a job takes minutes


class AttackerSettings(BaseSettings):
    """Environment variables QUMOS_ATTACKER_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="QUMOS_ATTACKER_", extra="ignore")

    breached_dir: Path = Field(description="the breached provider's data directory (read only)")
    coalition_dirs: list[Path] = Field(default_factory=list, description="more breached "
                                       "providers' data directories (read only), for "
                                       "`coalition` jobs; JSON list")
    data_dir: Path = Field(description="job records persist here")
    admin_token_file: Path = Field(description="token for submitting attack jobs")
    max_pending: int = Field(8, ge=1, le=1000, description="jobs queued or running before "
                             "a submission gets 503")
    orchestrator_url: str | None = Field(None, description="public API, for query/fidelity")
    api_key_file: Path | None = Field(None, description="the attacker's client API key for "
                                      "the public API (read at each job; never logged)")
    workers: int = Field(1, ge=1, le=8, description="jobs run concurrently")
    dataset_dir: Path = Field(Path("data"), description="where full MNIST files live")
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    predict_batch: int = Field(256, ge=1, le=1024, description="rows per public predict call")


# ----- the wire contract ------------------------------------------------------------------
class BudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fraction: float = Field(0.05, gt=0, le=1, description="labelled fraction of the train set")
    epochs: int = Field(75, ge=1, le=MAX_EPOCHS, description="training steps per restart")
    restarts: int = Field(24, ge=1, le=MAX_RESTARTS, description="restarts, learning rates "
                          "cycled")
    queries: int = Field(100, ge=1, le=MAX_QUERIES, description="own images sent through "
                         "the public API (breach+queries, queries)")


class AttackRequest(BaseModel):
    """POST /v1/attacks. The attacker's knowledge of the task (dataset, task, the
    victim's split seed) is given here; the test split of that task scores the theft."""

    model_config = ConfigDict(extra="forbid")
    provider: str | None = Field(None, description="must be the breached (mounted) provider")
    model: str | None = Field(None, description="which model, if the provider hosts several")
    profile: str = Field("breach", description="breach, breach+queries, queries or "
                         "coalition")
    coalition: list[str] = Field(default_factory=list, description="coalition: the "
                                 "providers breached together (mounted ones)")
    strategies: list[str] = Field(default_factory=list, description="a subset of the "
                                  "profile's strategies (default: all of them)")
    budget: BudgetIn = Field(default_factory=BudgetIn)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(
        default_factory=lambda: [0, 1, 2], description=f"1 to {MAX_SEEDS} distinct seeds, "
        f"each 0 to {MAX_SEED}")
    know_architecture: bool = Field(True, description="Kerckhoffs: needs `design`")
    design: Design | None = Field(None, description="the victim's design (Kerckhoffs)")
    dataset: str = "digits"
    task: int = 4
    split_seed: int = Field(0, ge=0, description="the victim's split seed")
    api_key: str | None = Field(None, max_length=200, description="client API key for the "
                                "orchestrator's public API (else QUMOS_ATTACKER_API_KEY_FILE); "
                                "kept in memory for the job only, never stored or logged")
    victim_acc: float | None = Field(None, ge=0, le=1, description="if known; else measured "
                                     "through the orchestrator's public API when set")

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
                raise ValueError(f"strategies[{i}] is {s!r}, not a strategy of profile "
                                 f"{profile}; allowed: {list(allowed)}")
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


# ----- state ------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _task_data(dataset: str, task: int, seed: int, data_dir: str):
    from qumos.datasets import load_task

    return load_task(dataset, task, seed=seed, data_dir=data_dir)


class AttackerState:
    def __init__(self, settings: AttackerSettings):
        self.settings = settings
        self.jobs_dir = Path(settings.data_dir) / "jobs"
        self.jobs: dict[str, Job] = {}
        self.job_keys: dict[str, str | None] = {}  # job id -> its API key (memory only)
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.provider: str | None = None
        self.breach_problem: str | None = None
        self.ready = False
        self.admin_token = read_token_file(settings.admin_token_file,
                                           "QUMOS_ATTACKER_ADMIN_TOKEN_FILE")
        self._last_save: dict[str, float] = {}

    def load(self) -> None:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        for p in sorted(self.jobs_dir.glob("*.json")):
            try:
                job = Job.model_validate_json(p.read_bytes())
            except (ValueError, OSError) as e:
                log.warning("skipping unreadable job file %s: %s", p, e)
                continue
            if job.status in ("queued", "running"):
                job.status = "interrupted"
                job.error = ("interrupted: the attacker restarted while this job was "
                             f"{'running' if job.started else 'queued'}; resubmit it")
                job.finished = time.time()
                self.save(job)
            self.jobs[job.id] = job
        self.check_breach()

    def check_breach(self) -> None:
        """Is BREACHED_DIR a provider's data directory? (It may hold no fragment yet.)"""
        from qumos.store import ProviderStore

        try:
            self.provider = ProviderStore.open_existing(self.settings.breached_dir).name
            self.breach_problem = None
        except QumosError as e:
            self.provider = None
            self.breach_problem = (f"{e}; give the data directory of one provider (it holds "
                                   "provider.json, fragments/ and access.jsonl)")

    def save(self, job: Job) -> None:
        atomic_write(self.jobs_dir / f"{job.id}.json", job.model_dump_json(indent=1).encode())

    def update(self, job: Job, force: bool = True, **changes) -> None:
        with self.lock:
            for k, v in changes.items():
                setattr(job, k, v)
            now = time.time()
            if force or now - self._last_save.get(job.id, 0) > 1.0:
                self._last_save[job.id] = now
                self.save(job)

    # ----- running a job (worker thread) ---------------------------------------------------
    def run(self, job: Job) -> None:
        import torch

        torch.set_num_threads(1)
        self.update(job, status="running", started=time.time())
        try:
            req = AttackRequest.model_validate({**job.request,
                                                "api_key": self.job_keys.pop(job.id, None)})
            res = run_job(self.settings, req, progress=lambda info: self.update(
                # merged, not replaced: a poller always sees where the job got to
                job, force=False, progress={**job.progress, **{
                    k: v for k, v in info.items() if k in (
                        "strategy", "seed", "restart", "epoch", "epochs", "done", "total",
                        "provider", "phase", "note")}}))
            self.update(job, status="succeeded", results=res, finished=time.time(),
                        progress={**job.progress, "done": len(req.seeds),
                                  "total": len(req.seeds)})
        except Exception as e:
            if not isinstance(e, QumosError):
                log.exception("attack job %s failed", job.id)
            self.update(job, status="failed", error=f"{type(e).__name__}: {e}",
                        finished=time.time())


def run_job(settings: AttackerSettings, req: AttackRequest, progress=None) -> dict:
    """One job with the one attack driver: the mounted provider's holdings, the public
    API through HttpOracle (rows attributed in the mounted log), the harness's victim
    answers on the test split through the same API (or `victim_acc` as given)."""
    import numpy as np
    from qumos.attack import AttackConfig, Victim, breach, report_table, run_attack
    from qumos.attack.context import strip
    from qumos.attack.live import HttpOracle
    from qumos.spec import build_spec

    holdings = breach(settings.breached_dir)
    stolen = holdings.fragment(req.model)
    data = _task_data(req.dataset, req.task, req.split_seed, str(settings.dataset_dir))
    cfg = AttackConfig(profile=req.profile, fraction=req.budget.fraction,
                       epochs=req.budget.epochs, restarts=req.budget.restarts,
                       queries=req.budget.queries, know_architecture=req.know_architecture,
                       strategies=tuple(req.strategies), coalition=tuple(req.coalition))
    mounted = [holdings]
    if req.profile == "coalition":
        mounted += [breach(d) for d in settings.coalition_dirs]
    oracle = labels = None
    acc = req.victim_acc
    if settings.orchestrator_url:
        oracle = HttpOracle(settings.orchestrator_url, stolen.model,
                            {stolen.index: settings.breached_dir},
                            api_key=req.api_key or _api_key(settings))
        labels = _victim_labels(settings, stolen.model, data.test.raw,
                                req.api_key or _api_key(settings))
        if acc is None:
            acc = float((labels == data.test.y).mean())
    if acc is None:
        raise QumosError("victim_acc: unknown; give it in the request or set "
                         "QUMOS_ATTACKER_ORCHESTRATOR_URL so the attacker can measure it")
    arch = strip(build_spec(req.design)) if req.design is not None else None
    held = {h.fragment(stolen.model).index: h.provider for h in mounted}
    n = max(max(held) + 1, len(req.design.fragments) if req.design else 0)
    providers = [held.get(k, f"fragment-{k}") for k in range(n)]
    victim = Victim(model=stolen.model, providers=providers, acc=acc,
                    test_labels=labels if labels is not None else
                    np.full(len(data.test.y), -1), arch=arch, oracle=oracle)
    rep = run_attack(cfg, data, victim, mounted, req.seeds, progress=progress)
    d = rep.to_dict()
    d["table"] = report_table(d)
    d["provider"], d["index"] = holdings.provider, stolen.index
    return d


def _api_key(settings: AttackerSettings) -> str | None:
    """The client API key (QUMOS_ATTACKER_API_KEY_FILE), read now: a deployment may
    create it after the attacker started."""
    if settings.api_key_file is None:
        return None
    try:
        return settings.api_key_file.read_text().strip() or None
    except OSError as e:
        raise QumosError(f"QUMOS_ATTACKER_API_KEY_FILE: cannot read {settings.api_key_file} "
                         f"({e.strerror})") from None


def _victim_labels(settings: AttackerSettings, model: str, raw,
                   api_key: str | None = None) -> np.ndarray:
    import httpx
    import numpy as np
    from qumos.client import predict

    out = []
    with httpx.Client(timeout=60.0) as client:
        for i in range(0, len(raw), settings.predict_batch):
            out.append(np.asarray(predict(client, settings.orchestrator_url, model,
                                          raw[i:i + settings.predict_batch],
                                          api_key=api_key).predictions))
    return np.concatenate(out) if out else np.zeros(0, dtype=int)


def _summary(job: Job) -> dict:
    d = job.model_dump()
    if d["results"]:
        d["results"] = {k: v for k, v in d["results"].items() if k != "runs"}
    return d


def create_app(settings: AttackerSettings | None = None) -> FastAPI:
    settings = load_settings(AttackerSettings, settings)
    state = AttackerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import anyio

        await anyio.to_thread.run_sync(state.load)
        state.pool = ThreadPoolExecutor(max_workers=settings.workers,
                                        thread_name_prefix="attack")
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="QuMoS attacker", lifespan=lifespan)
    app.state.attacker = state
    install_common(app, settings.max_body_bytes)
    document_request_bodies(app, {("/v1/attacks", "post"): AttackRequest})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", responses=error_responses(503))
    async def readyz():
        import anyio

        if not state.ready:
            raise ServiceError(503, "not_ready", "the attacker is starting")
        if state.provider is None:
            await anyio.to_thread.run_sync(state.check_breach)
        if state.provider is None:
            raise ServiceError(503, "not_ready", f"breached_dir: {state.breach_problem}",
                               "breached_dir")
        return {"status": "ready", "breached_provider": state.provider,
                "orchestrator": settings.orchestrator_url, "jobs": len(state.jobs)}

    @app.post("/v1/attacks", status_code=202, response_model=Job,
              responses=error_responses(401, 403, 409, 413, 422, 503))
    async def submit(request: Request):
        import anyio

        check_bearer(request, state.admin_token)
        pending = sum(j.status in ("queued", "running") for j in list(state.jobs.values()))
        if pending >= settings.max_pending:
            raise ServiceError(503, "queue_full", f"{pending} attack jobs are queued or "
                               f"running (the limit, QUMOS_ATTACKER_MAX_PENDING); retry after "
                               f"{QUEUE_RETRY_AFTER_S}s", headers={
                                   "Retry-After": str(QUEUE_RETRY_AFTER_S)})
        req = await parse_body(request, AttackRequest)
        await anyio.to_thread.run_sync(state.check_breach)
        if state.provider is None:
            raise ServiceError(409, "no_breach", f"breached_dir: {state.breach_problem}",
                               "breached_dir")
        if req.provider is not None and req.provider != state.provider:
            raise ServiceError(422, "validation_error", f"provider: {req.provider!r} is not "
                               f"the breached provider; allowed: {state.provider!r} (the "
                               "directory this attacker holds)", "provider")
        await anyio.to_thread.run_sync(_check_request, state, req)
        job = Job(id=uuid.uuid4().hex[:12], status="queued", provider=state.provider,
                  request=req.model_dump(mode="json", exclude={"api_key"}),
                  created=time.time())
        state.job_keys[job.id] = req.api_key
        await anyio.to_thread.run_sync(state.save, job)
        state.jobs[job.id] = job
        state.pool.submit(state.run, job)
        return _summary(job)

    @app.get("/v1/attacks")
    async def list_jobs():
        return {"attacks": [_summary(j) for j in sorted(state.jobs.values(),
                                                        key=lambda j: j.created)]}

    @app.get("/v1/attacks/{job_id}", response_model=Job, responses=error_responses(404))
    async def get_job(job_id: str):
        job = state.jobs.get(job_id)
        if job is None:
            raise ServiceError(404, "not_found", f"id: no attack job {job_id!r}", "id")
        with state.lock:
            return json.loads(job.model_dump_json())

    return app


def _check_request(state: AttackerState, req: AttackRequest) -> None:
    """Checks that need the breached holdings (run in a thread): 422 naming the field."""
    from qumos.attack import breach
    from qumos.datasets import DATASETS
    from qumos.spec import TASK_CLASSES, build_spec

    def bad(field: str, msg: str):
        raise ServiceError(422, "validation_error", f"{field}: {msg}", field)

    if req.dataset not in DATASETS:
        bad("dataset", f"unknown {req.dataset!r}; allowed: {list(DATASETS)}")
    if req.task not in TASK_CLASSES:
        bad("task", f"{req.task} is not a task; allowed: {sorted(TASK_CLASSES)}")
    if req.profile in ("breach+queries", "queries") and not state.settings.orchestrator_url:
        bad("profile", f"{req.profile} needs the orchestrator's public API, and this "
            "attacker has no QUMOS_ATTACKER_ORCHESTRATOR_URL; allowed here: breach")
    if req.victim_acc is None and not state.settings.orchestrator_url:
        bad("victim_acc", "unknown: give it (this attacker has no orchestrator URL to "
            "measure it)")
    try:
        holdings = breach(state.settings.breached_dir)
    except QumosError as e:
        raise ServiceError(409, "no_breach", f"breached_dir: {e}", "breached_dir") from None
    try:
        stolen = holdings.fragment(req.model)
    except QumosError as e:
        bad("model", str(e).removeprefix("model: "))
    if req.profile == "coalition":
        names = [holdings.provider]
        for d in state.settings.coalition_dirs:
            try:
                names.append(breach(d).provider)
            except QumosError as e:
                raise ServiceError(409, "no_breach", f"coalition_dirs: {e}",
                                   "coalition_dirs") from None
        if len(names) < 2:
            bad("profile", "coalition needs several breached providers and this attacker "
                "mounts one (set QUMOS_ATTACKER_COALITION_DIRS); allowed here: breach, "
                "breach+queries, queries")
        unknown = [p for p in req.coalition if p not in names]
        if len(set(req.coalition)) < 2 or unknown:
            bad("coalition", f"{req.coalition}: name 2 or more of the mounted providers "
                f"{names}" + (f" ({unknown} are not mounted)" if unknown else ""))
        if req.design is not None and len(set(req.coalition)) >= len(req.design.fragments):
            bad("coalition", f"breaches {len(set(req.coalition))} of "
                f"{len(req.design.fragments)} providers; a coalition holds fewer than all")
    elif req.coalition:
        bad("coalition", f"only profile coalition takes a coalition (profile is "
            f"{req.profile})")
    if req.profile in ("breach+queries", "queries"):
        from qumos.attack import attacker_data

        data = _task_data(req.dataset, req.task, req.split_seed,
                          str(state.settings.dataset_dir))
        pool = len(attacker_data(data, req.budget.fraction, req.seeds[0]).pool)
        if req.budget.queries > pool:
            bad("budget.queries", f"{req.budget.queries} is more than the {pool} unlabelled "
                f"images of the {req.dataset}-{req.task} training split")
    if req.know_architecture and req.design is None:
        bad("design", "the Kerckhoffs attacker (know_architecture true) needs the victim's "
            "design; send it or set know_architecture false")
    if req.design is not None:
        if (req.design.dataset, req.design.task) != (req.dataset, req.task):
            bad("design", f"is for {req.design.dataset}-{req.design.task}; the request's task "
                f"is {req.dataset}-{req.task}")
        try:
            arch = build_spec(req.design)
        except QumosError as e:
            bad("design", str(e).removeprefix("design: "))
        j = stolen.index
        if j >= arch.n_fragments:
            bad("design", f"has {arch.n_fragments} fragments; the stolen fragment is at "
                f"position {j}")
        f, want = stolen.fragment, arch.fragments[j]
        if (f.n_qubits, f.block, f.depth, f.entanglement) != (
                want.n_qubits, want.block, want.depth, want.entanglement):
            bad("design", f"fragments[{j}] is {want.block}:{want.depth} on {want.n_qubits} "
                f"qubits ({want.entanglement}); the stolen fragment is {f.block}:{f.depth} "
                f"on {f.n_qubits} ({f.entanglement})")
