"""The company's orchestrator: holds chain order, glue and head; chains providers over HTTP.

Run:  QUMOS_ORCH_DATA_DIR=runs/orch QUMOS_ORCH_TOKENS_DIR=runs/tokens \
      QUMOS_ORCH_ADMIN_TOKEN_FILE=runs/admin_token \
      QUMOS_ORCH_PROVIDERS=provider-a=http://127.0.0.1:8101,provider-b=...,provider-c=... \
      uvicorn --factory services.orchestrator.app:create_app --port 8100

Endpoints:
    PUT  /v1/models/{name}            register a model's company part (admin token; no
                                      fragment weights are accepted)
    PUT  /v1/models/{name}/canaries   register integrity canaries (admin token)
    GET  /v1/models, /v1/models/{name}
    POST /v1/models/{name}/predict    {"instances": [[raw pixels]], "shots"?, "seed"?}
    GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/1][/ready]
    POST /v2/models/{name}[/versions/1]/infer   Open Inference Protocol v2 (JSON and the
                                      binary tensor data extension; qumos.oip)
    PUT  /v1/models/{name}/policy     change a model's output policy (admin token)
    POST /v1/keys, GET /v1/keys, DELETE /v1/keys/{id}, GET /v1/keys/flagged
                                      client API keys (admin token; `qumos keys`)
    GET  /healthz, /readyz, /metrics

Defences of the public API (qumos.defense, docs/defenses.md): predict and infer need a
client API key (`Authorization: Bearer qk_...`; anonymous only with ALLOW_ANONYMOUS),
counted against its quota (429 + Retry-After + RateLimit-*); answers follow the model's
output policy; the extraction monitor (PRADA) watches each key; with BATCH_WINDOW_MS the
rows of concurrent requests share provider calls, shuffled.

Ready (/readyz, /v2/health/ready) means a prediction can be served: every registered
model's providers answer and hold its fragments (probed, cached READY_CACHE_S); a model
alone: /v2/models/{name}/ready. docs/api.md has the whole contract.

A predict call preprocesses the images (numpy), runs fragment k on provider placement[k]
with one pooled httpx.AsyncClient (explicit timeouts; execute is idempotent so failed
calls are retried, with backoff or the provider's Retry-After), applies glue and head in numpy, and returns
probabilities. Every provider answer is validated as untrusted input: a provider that
is down gives 503, a timeout 504, and a garbage answer 502, each naming the provider and
fragment -- never a wrong prediction. This module does not import torch.

Reliability and integrity:
- Each provider call has a hard deadline (TIMEOUT_S for the whole call, so a provider
  that trickles bytes cannot stall us); a provider's 429/503 with Retry-After is retried
  (at most RETRIES times, waiting Retry-After capped at MAX_RETRY_AFTER_S), then 503
  naming it. At most MAX_INFLIGHT requests in flight; more get 503 + Retry-After.
- Canaries: when the company registered canaries for a model (inputs with outputs it
  computed with the full model at deploy time), every call to a provider carries
  CANARIES_PER_CALL of them at random positions; a provider whose canary outputs are
  off (exact: > tolerance; shots: > shots_z standard errors) gets a 502 "integrity check
  failed" naming it and the fragment, and no prediction is returned. Canary choice and
  positions come from a secret key (DATA_DIR/canary.key), so a provider cannot predict
  them even for seeded requests.
- Writes to DATA_DIR that fail (disk full, read-only) give 507; serving goes on.

Layout: `settings.py` (the environment), `core.py` (registration and predictions),
`providers.py` (the provider calls), `canaries.py` (integrity), `registry.py` (DATA_DIR),
`routes.py` (the HTTP routes), this module (the app: lifespan, middleware, metrics).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import anyio
import httpx
from fastapi import FastAPI
from qumos.config import load_settings
from qumos.web import freeze_startup_heap, install_common

from services.orchestrator.core import Orchestrator
from services.orchestrator.routes import add_routes
from services.orchestrator.settings import OrchestratorSettings

log = logging.getLogger("qumos.orchestrator")


def create_app(settings: OrchestratorSettings | None = None,
               transport: httpx.AsyncBaseTransport | None = None,
               mounts: dict[str, httpx.AsyncBaseTransport] | None = None) -> FastAPI:
    """`transport`/`mounts` replace the network for in-process tests (httpx.ASGITransport)."""
    settings = load_settings(OrchestratorSettings, settings)
    orch = Orchestrator(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await anyio.to_thread.run_sync(orch.load)
        orch.providers.open(transport, mounts)
        freeze_startup_heap()
        orch.ready = True
        flusher = asyncio.get_running_loop().create_task(flush_quota(orch))
        try:
            yield
        finally:
            orch.ready = False
            flusher.cancel()
            try:
                orch.guard.quota.flush()
            except OSError as e:
                log.error("quota counters not saved at shutdown: %s", e.strerror or e)
            await orch.providers.close()

    app = FastAPI(title="QuMoS orchestrator", lifespan=lifespan)
    app.state.orchestrator = orch
    install_common(app, settings.max_body_bytes, max_inflight=settings.max_inflight)
    add_metrics(orch, app.state.metrics_registry)
    add_routes(app, orch)
    return app


async def flush_quota(orch: Orchestrator) -> None:
    """The quota counters, when changed, every QUOTA_FLUSH_S."""
    while True:
        await anyio.sleep(orch.settings.quota_flush_s)
        try:
            await anyio.to_thread.run_sync(orch.guard.quota.flush)
        except OSError as e:
            log.error("quota counters not saved: %s", e.strerror or e)


def add_metrics(orch: Orchestrator, reg) -> None:
    from prometheus_client import Counter, Histogram

    orch.integrity.counters = {
        "canary_checks": Counter("qumos_orch_canary_checks", "provider calls whose canaries "
                                 "were checked", ["provider"], registry=reg),
        "integrity_failures": Counter("qumos_orch_integrity_failures", "provider calls that "
                                      "failed the canary check", ["provider"], registry=reg)}
    orch.providers.failures = Counter("qumos_orch_provider_failures", "provider calls that "
                                      "failed after retries", ["provider"], registry=reg)
    orch.batch_metrics = {
        "batch_wait": Histogram("qumos_orch_batch_wait_seconds", "dynamic batching: a "
                                "request's wait from arrival to dispatch", registry=reg,
                                buckets=(.0005, .001, .0015, .002, .0025, .003, .004, .005,
                                         .01, .025, .05, .1, .25, 1.0)),
        "batch_requests": Histogram("qumos_orch_batch_requests", "dynamic batching: requests "
                                    "per batch", registry=reg,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))}
    orch.guard.counters = {
        "images": Counter("qumos_orch_key_images", "images predicted per client key (id)",
                          ["key"], registry=reg),
        "refused": Counter("qumos_orch_key_refused", "requests refused per key (id) and "
                           "reason", ["key", "reason"], registry=reg),
        "flagged": Counter("qumos_orch_key_flagged", "keys flagged by the extraction "
                           "monitor", ["key"], registry=reg)}


__all__ = ["create_app"]
