"""The attacker's state and logic: job records in DATA_DIR/jobs (atomic rewrites), the
breached directory, the checks of a request against it, and running a job with the one
attack driver (`qumos.attack.run_attack`) in a worker thread. No web framework here;
`routes.py` maps requests to these methods."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from qumos.config import read_token_file
from qumos.errors import QumosError, ServiceError
from qumos.files import atomic_write

from services.attacker.models import AttackRequest, Job
from services.attacker.settings import AttackerSettings

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("qumos.attacker")
QUEUE_RETRY_AFTER_S = 30  # a job takes minutes


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
        self.admin_token = read_token_file(
            settings.admin_token_file, "QUMOS_ATTACKER_ADMIN_TOKEN_FILE"
        )
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
                job.error = (
                    "interrupted: the attacker restarted while this job was "
                    f"{'running' if job.started else 'queued'}; resubmit it"
                )
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
            self.breach_problem = (
                f"{e}; give the data directory of one provider (it holds "
                "provider.json, fragments/ and access.jsonl)"
            )

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

    # ----- the API --------------------------------------------------------------------------
    async def readiness(self) -> dict:
        """/readyz's body: 503 while starting or while BREACHED_DIR is not a provider's."""
        if not self.ready:
            raise ServiceError(503, "not_ready", "the attacker is starting")
        if self.provider is None:
            await anyio.to_thread.run_sync(self.check_breach)
        if self.provider is None:
            raise ServiceError(
                503, "not_ready", f"breached_dir: {self.breach_problem}", "breached_dir"
            )
        return {
            "status": "ready",
            "breached_provider": self.provider,
            "orchestrator": self.settings.orchestrator_url,
            "jobs": len(self.jobs),
        }

    def check_room(self) -> None:
        """503 + Retry-After when MAX_PENDING jobs are queued or running."""
        pending = sum(j.status in ("queued", "running") for j in list(self.jobs.values()))
        if pending >= self.settings.max_pending:
            raise ServiceError(
                503,
                "queue_full",
                f"{pending} attack jobs are queued or "
                f"running (the limit, QUMOS_ATTACKER_MAX_PENDING); retry after "
                f"{QUEUE_RETRY_AFTER_S}s",
                headers={"Retry-After": str(QUEUE_RETRY_AFTER_S)},
            )

    async def submit(self, req: AttackRequest) -> dict:
        """Check `req` against the breached holdings (409/422 naming the field), record the
        job and queue it; its summary."""
        await anyio.to_thread.run_sync(self.check_breach)
        if self.provider is None:
            raise ServiceError(
                409, "no_breach", f"breached_dir: {self.breach_problem}", "breached_dir"
            )
        if req.provider is not None and req.provider != self.provider:
            raise ServiceError(
                422,
                "validation_error",
                f"provider: {req.provider!r} is not "
                f"the breached provider; allowed: {self.provider!r} (the "
                "directory this attacker holds)",
                "provider",
            )
        await anyio.to_thread.run_sync(check_request, self.settings, req)
        job = Job(
            id=uuid.uuid4().hex[:12],
            status="queued",
            provider=self.provider,
            request=req.model_dump(mode="json", exclude={"api_key"}),
            created=time.time(),
        )
        self.job_keys[job.id] = req.api_key
        await anyio.to_thread.run_sync(self.save, job)
        self.jobs[job.id] = job
        self.pool.submit(self.run, job)
        return summary(job)

    def list_jobs(self) -> dict:
        return {
            "attacks": [summary(j) for j in sorted(self.jobs.values(), key=lambda j: j.created)]
        }

    def job(self, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        if job is None:
            raise ServiceError(404, "not_found", f"id: no attack job {job_id!r}", "id")
        with self.lock:
            return json.loads(job.model_dump_json())

    # ----- running a job (worker thread) ---------------------------------------------------
    def run(self, job: Job) -> None:
        import torch

        torch.set_num_threads(1)
        self.update(job, status="running", started=time.time())
        try:
            req = AttackRequest.model_validate(
                {**job.request, "api_key": self.job_keys.pop(job.id, None)}
            )
            res = run_job(
                self.settings,
                req,
                progress=lambda info: self.update(
                    # merged, not replaced: a poller always sees where the job got to
                    job,
                    force=False,
                    progress={
                        **job.progress,
                        **{
                            k: v
                            for k, v in info.items()
                            if k
                            in (
                                "strategy",
                                "seed",
                                "restart",
                                "epoch",
                                "epochs",
                                "done",
                                "total",
                                "provider",
                                "phase",
                                "note",
                            )
                        },
                    },
                ),
            )
            self.update(
                job,
                status="succeeded",
                results=res,
                finished=time.time(),
                progress={**job.progress, "done": len(req.seeds), "total": len(req.seeds)},
            )
        except Exception as e:
            if not isinstance(e, QumosError):
                log.exception("attack job %s failed", job.id)
            self.update(
                job, status="failed", error=f"{type(e).__name__}: {e}", finished=time.time()
            )


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
    cfg = AttackConfig(
        profile=req.profile,
        fraction=req.budget.fraction,
        epochs=req.budget.epochs,
        restarts=req.budget.restarts,
        queries=req.budget.queries,
        know_architecture=req.know_architecture,
        strategies=tuple(req.strategies),
        coalition=tuple(req.coalition),
    )
    mounted = [holdings]
    if req.profile == "coalition":
        mounted += [breach(d) for d in settings.coalition_dirs]
    oracle = labels = None
    acc = req.victim_acc
    if settings.orchestrator_url:
        oracle = HttpOracle(
            settings.orchestrator_url,
            stolen.model,
            {stolen.index: settings.breached_dir},
            api_key=req.api_key or _api_key(settings),
        )
        labels = _victim_labels(
            settings, stolen.model, data.test.raw, req.api_key or _api_key(settings)
        )
        if acc is None:
            acc = float((labels == data.test.y).mean())
    if acc is None:
        raise QumosError(
            "victim_acc: unknown; give it in the request or set "
            "QUMOS_ATTACKER_ORCHESTRATOR_URL so the attacker can measure it"
        )
    arch = strip(build_spec(req.design)) if req.design is not None else None
    held = {h.fragment(stolen.model).index: h.provider for h in mounted}
    n = max(max(held) + 1, len(req.design.fragments) if req.design else 0)
    providers = [held.get(k, f"fragment-{k}") for k in range(n)]
    victim = Victim(
        model=stolen.model,
        providers=providers,
        acc=acc,
        test_labels=labels if labels is not None else np.full(len(data.test.y), -1),
        arch=arch,
        oracle=oracle,
    )
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
        raise QumosError(
            f"QUMOS_ATTACKER_API_KEY_FILE: cannot read {settings.api_key_file} ({e.strerror})"
        ) from None


def _victim_labels(
    settings: AttackerSettings, model: str, raw, api_key: str | None = None
) -> np.ndarray:
    import httpx
    import numpy as np
    from qumos.client import predict

    out = []
    with httpx.Client(timeout=60.0) as client:
        for i in range(0, len(raw), settings.predict_batch):
            out.append(
                np.asarray(
                    predict(
                        client,
                        settings.orchestrator_url,
                        model,
                        raw[i : i + settings.predict_batch],
                        api_key=api_key,
                    ).predictions
                )
            )
    return np.concatenate(out) if out else np.zeros(0, dtype=int)


def summary(job: Job) -> dict:
    d = job.model_dump()
    if d["results"]:
        d["results"] = {k: v for k, v in d["results"].items() if k != "runs"}
    return d


def check_request(settings: AttackerSettings, req: AttackRequest) -> None:
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
    if req.profile in ("breach+queries", "queries") and not settings.orchestrator_url:
        bad(
            "profile",
            f"{req.profile} needs the orchestrator's public API, and this "
            "attacker has no QUMOS_ATTACKER_ORCHESTRATOR_URL; allowed here: breach",
        )
    if req.victim_acc is None and not settings.orchestrator_url:
        bad("victim_acc", "unknown: give it (this attacker has no orchestrator URL to measure it)")
    try:
        holdings = breach(settings.breached_dir)
    except QumosError as e:
        raise ServiceError(409, "no_breach", f"breached_dir: {e}", "breached_dir") from None
    try:
        stolen = holdings.fragment(req.model)
    except QumosError as e:
        bad("model", str(e).removeprefix("model: "))
    if req.profile == "coalition":
        names = [holdings.provider]
        for d in settings.coalition_dirs:
            try:
                names.append(breach(d).provider)
            except QumosError as e:
                raise ServiceError(
                    409, "no_breach", f"coalition_dirs: {e}", "coalition_dirs"
                ) from None
        if len(names) < 2:
            bad(
                "profile",
                "coalition needs several breached providers and this attacker "
                "mounts one (set QUMOS_ATTACKER_COALITION_DIRS); allowed here: breach, "
                "breach+queries, queries",
            )
        unknown = [p for p in req.coalition if p not in names]
        if len(set(req.coalition)) < 2 or unknown:
            bad(
                "coalition",
                f"{req.coalition}: name 2 or more of the mounted providers "
                f"{names}" + (f" ({unknown} are not mounted)" if unknown else ""),
            )
        if req.design is not None and len(set(req.coalition)) >= len(req.design.fragments):
            bad(
                "coalition",
                f"breaches {len(set(req.coalition))} of "
                f"{len(req.design.fragments)} providers; a coalition holds fewer than all",
            )
    elif req.coalition:
        bad("coalition", f"only profile coalition takes a coalition (profile is {req.profile})")
    if req.profile in ("breach+queries", "queries"):
        from qumos.attack import attacker_data

        data = _task_data(req.dataset, req.task, req.split_seed, str(settings.dataset_dir))
        pool = len(attacker_data(data, req.budget.fraction, req.seeds[0]).pool)
        if req.budget.queries > pool:
            bad(
                "budget.queries",
                f"{req.budget.queries} is more than the {pool} unlabelled "
                f"images of the {req.dataset}-{req.task} training split",
            )
    if req.know_architecture and req.design is None:
        bad(
            "design",
            "the Kerckhoffs attacker (know_architecture true) needs the victim's "
            "design; send it or set know_architecture false",
        )
    if req.design is not None:
        if (req.design.dataset, req.design.task) != (req.dataset, req.task):
            bad(
                "design",
                f"is for {req.design.dataset}-{req.design.task}; the request's task "
                f"is {req.dataset}-{req.task}",
            )
        try:
            arch = build_spec(req.design)
        except QumosError as e:
            bad("design", str(e).removeprefix("design: "))
        j = stolen.index
        if j >= arch.n_fragments:
            bad(
                "design",
                f"has {arch.n_fragments} fragments; the stolen fragment is at position {j}",
            )
        f, want = stolen.fragment, arch.fragments[j]
        if (f.n_qubits, f.block, f.depth, f.entanglement) != (
            want.n_qubits,
            want.block,
            want.depth,
            want.entanglement,
        ):
            bad(
                "design",
                f"fragments[{j}] is {want.block}:{want.depth} on {want.n_qubits} "
                f"qubits ({want.entanglement}); the stolen fragment is {f.block}:{f.depth} "
                f"on {f.n_qubits} ({f.entanglement})",
            )
