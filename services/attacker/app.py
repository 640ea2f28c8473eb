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

Layout: `settings.py` (the environment), `models.py` (the request and job records),
`core.py` (the state and logic), `routes.py` (the HTTP routes), this module (the app).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from qumos.config import load_settings
from qumos.web import install_common

from services.attacker.core import AttackerState
from services.attacker.routes import add_routes
from services.attacker.settings import AttackerSettings


def create_app(settings: AttackerSettings | None = None) -> FastAPI:
    settings = load_settings(AttackerSettings, settings)
    state = AttackerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
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
    add_routes(app, state)
    return app
