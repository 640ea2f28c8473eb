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
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
from fastapi import FastAPI, Request, Response
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from qumos.artifact import FragmentFile
from qumos.client import (
    ExecuteRequest,
    ExecuteResponse,
    FragmentInfo,
    FragmentList,
    dump_json,
)
from qumos.quantum import FAKE_BACKENDS, AerRunner, DeviceProfile
from qumos.store import ProviderStore, StoreError
from qumos.webcommon import (
    ServiceError,
    SettingsError,
    check_bearer,
    document_request_bodies,
    error_responses,
    freeze_startup_heap,
    hot_route,
    install_common,
    json_response,
    load_settings,
    parse_body,
    read_token_file,
)

log = logging.getLogger("qumos.provider")


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
    inline_rows: int = Field(16, ge=0, le=1024, description="exact batches of at most this "
                             "many rows on an ideal device run on the event loop (a few ms), "
                             "skipping the ~0.6 ms hand-off to a worker thread; 0 = never")
    max_inflight: int = Field(64, ge=1, description="requests in flight before 503")
    access_log_required: bool = Field(False, description="refuse (507) an answer whose "
                                      "access-log line cannot be written")


@dataclass
class Loaded:
    file: FragmentFile
    runner: AerRunner


class ProviderState:
    def __init__(self, settings: ProviderSettings, token: str):
        self.settings = settings
        self.token = token
        self.store = ProviderStore.create(settings.data_dir, settings.name)
        self.profile = DeviceProfile(fake_backend=settings.device,
                                     depolarizing_1q=settings.depol_1q,
                                     depolarizing_2q=settings.depol_2q,
                                     readout_error=settings.readout_error)
        self.fragments: dict[str, Loaded] = {}
        self.problems: list[str] = []
        self.ready = False
        self.limiter: anyio.CapacityLimiter | None = None  # made in the lifespan
        self.log_failures = 0
        self.last_log_error: str | None = None
        self.log_failure_counter = None  # prometheus Counter, set in create_app

    def load_all(self) -> None:
        """Reload every fragment from the data directory (runs in a worker thread)."""
        files, problems = self.store.load_all()
        for fid, ff in files.items():
            try:
                self.fragments[fid] = Loaded(ff, AerRunner(ff.fragment, self.profile))
            except ValueError as e:
                problems.append(f"{fid}: {e}")
        self.problems = problems
        for p in problems:
            log.error("fragment not loaded: %s", p)

    def info(self, fid: str) -> FragmentInfo:
        ld = self.fragments[fid]
        f = ld.file.fragment
        return FragmentInfo(fragment_id=fid, model=ld.file.model, index=ld.file.index,
                            n_qubits=f.n_qubits, n_inputs=f.n_inputs, block=f.block,
                            depth=f.depth, entanglement=f.entanglement, n_params=f.n_params,
                            transpiled_depth=ld.runner.circuit.depth())

    def get(self, fid: str) -> Loaded:
        ld = self.fragments.get(fid)
        if ld is None:
            raise ServiceError(404, "not_found", f"fragment_id: {fid!r} is not deployed on "
                               f"{self.settings.name}; deployed: {sorted(self.fragments)}",
                               "fragment_id")
        return ld


def _execute(state: ProviderState, fid: str, ld: Loaded, req: ExecuteRequest) -> bytes:
    """Worker thread: one Aer call for the whole batch, then the access-log line. Returns
    the ExecuteResponse as JSON (orjson straight from the arrays: at batch 256 the
    standard json module was half of a call's overhead)."""
    inputs = np.asarray(req.inputs, dtype=float)
    t0 = time.perf_counter()
    out = np.ascontiguousarray(ld.runner.run(inputs, shots=req.shots, seed=req.seed),
                               dtype=float)
    seconds = time.perf_counter() - t0
    try:
        state.store.append_log({"fragment_id": fid, "provider": state.settings.name,
                                "shots": req.shots, "seed": req.seed, "seconds": seconds,
                                "inputs": inputs, "outputs": out})
    except OSError as e:
        state.log_failures += 1
        state.last_log_error = f"{state.store.log_path}: {e.strerror or e}"
        if state.log_failure_counter is not None:
            state.log_failure_counter.inc()
        log.error("access log append failed (%s); %s", state.last_log_error,
                  "refusing the answer" if state.settings.access_log_required
                  else "serving the answer")
        if state.settings.access_log_required:
            raise _storage_error(state, "access log", e) from None
    return dump_json({"outputs": out, "provider": state.settings.name, "fragment_id": fid,
                      "shots": req.shots, "seconds": seconds})


def _storage_error(state: ProviderState, what: str, e: OSError) -> ServiceError:
    return ServiceError(507, "insufficient_storage", f"data_dir: cannot write the {what} "
                        f"in {state.settings.data_dir} ({e.strerror or e}); fragments already "
                        f"deployed on {state.settings.name} keep serving", "data_dir")


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
    document_request_bodies(app, {("/v1/fragments/{fragment_id}", "put"): FragmentFile,
                                  ("/v1/fragments/{fragment_id}/execute", "post"):
                                      ExecuteRequest})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "provider": settings.name}

    @app.get("/readyz")
    async def readyz():
        body = {"status": "ready" if state.ready else "starting", "provider": settings.name,
                "fragments": len(state.fragments), "problems": state.problems,
                "degraded": ([(f"access log: {state.log_failures} lines not written "
                               f"(last: {state.last_log_error})")] if state.log_failures
                             else [])}
        if not state.ready:
            raise ServiceError(503, "not_ready", f"{settings.name} is still loading its "
                               "fragments")
        return body

    @app.get("/v1/fragments", response_model=FragmentList)
    async def list_fragments():
        return json_response(FragmentList(provider=settings.name,
                                          fragments=[state.info(f) for f in sorted(state.fragments)]))

    @app.get("/v1/fragments/{fragment_id}", response_model=FragmentInfo,
             responses=error_responses(404))
    async def get_fragment(fragment_id: str):
        state.get(fragment_id)
        return json_response(state.info(fragment_id))

    @app.put("/v1/fragments/{fragment_id}", status_code=201, response_model=FragmentInfo,
             responses=error_responses(401, 403, 413, 422, 503, 507))
    async def deploy(fragment_id: str, request: Request):
        check_bearer(request, state.token)
        ff = await parse_body(request, FragmentFile)
        if ff.fragment_id != fragment_id:
            raise ServiceError(422, "validation_error", f"fragment_id: the path says "
                               f"{fragment_id!r} but the body is {ff.fragment_id!r} "
                               "(model.index)", "fragment_id")
        if ff.provider != settings.name:
            raise ServiceError(422, "validation_error", f"provider: the fragment is placed on "
                               f"{ff.provider!r}; this is {settings.name!r}", "provider")
        if ff.fragment.params is None:
            raise ServiceError(422, "validation_error", "fragment.params: missing; a deployed "
                               "fragment needs its trained parameters", "fragment.params")

        def build_and_store() -> Loaded:
            runner = AerRunner(ff.fragment, state.profile)  # transpiled once, here
            state.store.put(ff)  # atomic write
            return Loaded(ff, runner)

        try:
            loaded = await anyio.to_thread.run_sync(build_and_store, limiter=state.limiter)
        except OSError as e:  # disk full, read-only data directory
            raise _storage_error(state, f"fragment {fragment_id}", e) from None
        except (ValueError, StoreError) as e:
            raise ServiceError(422, "validation_error", f"fragment: {e}", "fragment") from None
        state.fragments[fragment_id] = loaded
        freeze_startup_heap()  # the new circuit and what transpiling loaded, too
        return json_response(state.info(fragment_id), status=201)

    @app.delete("/v1/fragments/{fragment_id}", responses=error_responses(401, 403, 404, 503,
                                                                          507))
    async def delete(fragment_id: str, request: Request):
        check_bearer(request, state.token)
        state.get(fragment_id)
        try:
            await anyio.to_thread.run_sync(state.store.delete, fragment_id)
        except OSError as e:
            raise _storage_error(state, f"removal of fragment {fragment_id}", e) from None
        state.fragments.pop(fragment_id, None)
        return {"deleted": fragment_id}

    @hot_route(app, "POST", "/v1/fragments/{fragment_id}/execute",
               response_model=ExecuteResponse,
               responses=error_responses(401, 403, 404, 413, 422, 503, 507))
    async def execute(fragment_id: str, request: Request):
        check_bearer(request, state.token)
        ld = state.get(fragment_id)
        req = await parse_body(request, ExecuteRequest)
        n = ld.file.fragment.n_inputs
        if not req.inputs:
            raise ServiceError(422, "validation_error", "inputs: empty batch; send 1 to "
                               f"{settings.max_batch} rows of {n} values", "inputs")
        if len(req.inputs) > settings.max_batch:
            raise ServiceError(413, "batch_too_large", f"inputs: {len(req.inputs)} rows; "
                               f"allowed: at most {settings.max_batch} per call", "inputs")
        for i, row in enumerate(req.inputs):
            if len(row) != n:
                raise ServiceError(422, "validation_error", f"inputs[{i}]: has {len(row)} "
                                   f"values; fragment {fragment_id} takes {n} input angles",
                                   f"inputs[{i}]")
        if (req.shots is None and state.profile.is_ideal
                and len(req.inputs) <= settings.inline_rows):
            body = _execute(state, fragment_id, ld, req)  # small and exact: on the loop
        else:
            body = await anyio.to_thread.run_sync(_execute, state, fragment_id, ld, req,
                                                  limiter=state.limiter)
        return Response(body, media_type="application/json")

    return app
