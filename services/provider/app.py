"""A simulated quantum cloud provider: stores deployed fragments, runs them on its own Aer.

Run:  QUMOS_PROVIDER_NAME=provider-a QUMOS_PROVIDER_DATA_DIR=runs/a \
      QUMOS_PROVIDER_TOKEN_FILE=runs/tokens/provider-a \
      uvicorn --factory services.provider.app:create_app --port 8101

Endpoints (deploy and execute need `Authorization: Bearer <token>`):
    PUT    /v1/fragments/{fragment_id}          deploy a FragmentFile (atomic, persistent)
    GET    /v1/fragments                        what this provider holds (metadata)
    GET    /v1/fragments/{fragment_id}          one fragment's metadata
    DELETE /v1/fragments/{fragment_id}          remove a fragment
    POST   /v1/fragments/{fragment_id}/execute  {inputs, shots?, seed?} -> {outputs, ...}
    GET    /healthz, /readyz, /metrics

Everything the provider keeps lives in its data directory (`qumos.store.ProviderStore`);
every executed batch is appended to its access log. One Aer call per batch, with the
fragment's circuit transpiled once (at deploy or load). Batches run in worker threads
(WORKERS at a time), except small exact ones on an ideal device (at most INLINE_ROWS
rows: ~10 ms of Aer), which run on the event loop itself: handing a call to a thread and
back costs ~0.6 ms here, a sizeable part of a batch-1 prediction's HTTP overhead, while
the loop is blocked no longer than one such call. Shots, noise and larger batches can
take much longer and always go to a thread.

Reliability policy:
- At most MAX_INFLIGHT requests in flight; more get 503 "overloaded" with Retry-After.
- A deploy or delete that cannot be written (disk full, read-only data directory) gets
  507 naming the data directory; fragments already loaded keep serving.
- Access-log append failure: the access log is the provider's record of what it served,
  so its loss is counted (`qumos_provider_access_log_failures_total`, and /readyz lists
  it under "degraded") and logged -- but by default the computed answer is still served:
  a full disk must not turn a correct answer into an error. ACCESS_LOG_REQUIRED=true
  makes it fail closed instead (507, no answer without a log line).

Layout: `settings.py` (the environment), `core.py` (the state and logic), `routes.py`
(the HTTP routes), this module (the app: lifespan, middleware, metrics).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from qumos.config import load_settings, read_token_file
from qumos.errors import SettingsError, StoreError
from qumos.quantum import FAKE_BACKENDS
from qumos.web import freeze_startup_heap, install_common

from services.provider.core import ProviderState
from services.provider.routes import add_routes
from services.provider.settings import ProviderSettings

log = logging.getLogger("qumos.provider")


def create_app(settings: ProviderSettings | None = None) -> FastAPI:
    settings = load_settings(ProviderSettings, settings)
    if settings.device is not None and settings.device not in FAKE_BACKENDS:
        raise SettingsError(f"QUMOS_PROVIDER_DEVICE is {settings.device!r}; allowed: "
                            f"{', '.join(FAKE_BACKENDS)}")
    token = read_token_file(settings.token_file, "QUMOS_PROVIDER_TOKEN_FILE")
    try:
        state = ProviderState(settings, token)
    except StoreError as e:
        raise SettingsError(f"QUMOS_PROVIDER_DATA_DIR: {e}") from None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.limiter = anyio.CapacityLimiter(settings.workers)
        await anyio.to_thread.run_sync(state.load_all)
        freeze_startup_heap()
        state.ready = True
        log.info("%s ready with %d fragments", settings.name, len(state.fragments))
        yield
        state.ready = False

    app = FastAPI(title=f"QuMoS provider {settings.name}", lifespan=lifespan)
    app.state.provider = state
    install_common(app, settings.max_body_bytes, max_inflight=settings.max_inflight)
    from prometheus_client import Counter

    state.log_failure_counter = Counter(
        "qumos_provider_access_log_failures", "access-log lines that could not be written",
        registry=app.state.metrics_registry)
    add_routes(app, state)
    return app
