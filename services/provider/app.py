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
every executed batch is appended to its access log. Simulation runs in worker threads,
one Aer call per batch, with the fragment's circuit transpiled once (at deploy or load).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
from fastapi import FastAPI, Request
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from qumos.artifact import FragmentFile
from qumos.client import ExecuteRequest, ExecuteResponse, FragmentInfo, FragmentList
from qumos.quantum import FAKE_BACKENDS, AerRunner, DeviceProfile
from qumos.store import ProviderStore, StoreError
from qumos.webcommon import (
    ServiceError,
    SettingsError,
    check_bearer,
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


def _execute(state: ProviderState, fid: str, ld: Loaded, req: ExecuteRequest) -> ExecuteResponse:
    """Worker thread: one Aer call for the whole batch, then the access-log line."""
    inputs = np.asarray(req.inputs, dtype=float)
    t0 = time.perf_counter()
    out = ld.runner.run(inputs, shots=req.shots, seed=req.seed)
    seconds = time.perf_counter() - t0
    outputs = out.tolist()
    state.store.append_log({"fragment_id": fid, "provider": state.settings.name,
                            "shots": req.shots, "seed": req.seed, "seconds": seconds,
                            "inputs": req.inputs, "outputs": outputs})
    return ExecuteResponse(outputs=outputs, provider=state.settings.name, fragment_id=fid,
                           shots=req.shots, seconds=seconds)


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
        state.ready = True
        log.info("%s ready with %d fragments", settings.name, len(state.fragments))
        yield
        state.ready = False

    app = FastAPI(title=f"QuMoS provider {settings.name}", lifespan=lifespan)
    app.state.provider = state
    install_common(app, settings.max_body_bytes)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "provider": settings.name}

    @app.get("/readyz")
    async def readyz():
        body = {"status": "ready" if state.ready else "starting", "provider": settings.name,
                "fragments": len(state.fragments), "problems": state.problems}
        if not state.ready:
            raise ServiceError(503, "not_ready", f"{settings.name} is still loading its "
                               "fragments")
        return body

    @app.get("/v1/fragments")
    async def list_fragments():
        return json_response(FragmentList(provider=settings.name,
                                          fragments=[state.info(f) for f in sorted(state.fragments)]))

    @app.get("/v1/fragments/{fragment_id}")
    async def get_fragment(fragment_id: str):
        state.get(fragment_id)
        return json_response(state.info(fragment_id))

    @app.put("/v1/fragments/{fragment_id}", status_code=201)
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
        except (ValueError, StoreError) as e:
            raise ServiceError(422, "validation_error", f"fragment: {e}", "fragment") from None
        state.fragments[fragment_id] = loaded
        return json_response(state.info(fragment_id), status=201)

    @app.delete("/v1/fragments/{fragment_id}")
    async def delete(fragment_id: str, request: Request):
        check_bearer(request, state.token)
        state.get(fragment_id)
        await anyio.to_thread.run_sync(state.store.delete, fragment_id)
        state.fragments.pop(fragment_id, None)
        return {"deleted": fragment_id}

    @app.post("/v1/fragments/{fragment_id}/execute")
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
        resp = await anyio.to_thread.run_sync(_execute, state, fragment_id, ld, req,
                                              limiter=state.limiter)
        return json_response(resp)

    return app
