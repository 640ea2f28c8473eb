"""The company's orchestrator: holds chain order, glue and head; chains providers over HTTP.

Run:  QUMOS_ORCH_DATA_DIR=runs/orch QUMOS_ORCH_TOKENS_DIR=runs/tokens \
      QUMOS_ORCH_ADMIN_TOKEN_FILE=runs/admin_token \
      QUMOS_ORCH_PROVIDERS=provider-a=http://127.0.0.1:8101,provider-b=...,provider-c=... \
      uvicorn --factory services.orchestrator.app:create_app --port 8100

Endpoints:
    PUT  /v1/models/{name}            register a model's company part (admin token; no
                                      fragment weights are accepted)
    GET  /v1/models, /v1/models/{name}
    POST /v1/models/{name}/predict    {"instances": [[raw pixels]], "shots"?, "seed"?}
    GET  /v2/health/live, /v2/health/ready, /v2/models/{name}
    POST /v2/models/{name}/infer      Open Inference Protocol v2
    GET  /healthz, /readyz, /metrics

A predict call preprocesses the images (numpy), runs fragment k on provider placement[k]
with one pooled httpx.AsyncClient (explicit timeouts; execute is idempotent so failed
calls are retried with tenacity), applies glue and head in numpy, and returns
probabilities. Every provider answer is validated as untrusted input: a provider that
is down gives 503, a timeout 504, and a garbage answer 502, each naming the provider and
fragment -- never a wrong prediction. This module does not import torch.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI, Request
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from qumos.artifact import atomic_write, fragment_id
from qumos.chain import glue_forward, head_forward, preprocess, softmax
from qumos.client import (
    ExecuteResponse,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    V2InferRequest,
    V2InferResponse,
    V2Tensor,
    describe_validation_error,
)
from qumos.spec import ModelSpec, format_validation_error
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
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

log = logging.getLogger("qumos.orchestrator")
OUTPUT_TOLERANCE = 1e-6  # provider outputs must lie in [-1 - tol, 1 + tol]


class OrchestratorSettings(BaseSettings):
    """Environment variables QUMOS_ORCH_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="QUMOS_ORCH_", extra="ignore")

    data_dir: Path = Field(description="registered models persist here")
    providers: str = Field(description="name=url,name=url,... of every provider")
    tokens_dir: Path = Field(description="one file per provider, named after it, with its token")
    admin_token_file: Path = Field(description="token for registering models")
    timeout_s: float = Field(30.0, gt=0, description="per provider call")
    retries: int = Field(2, ge=0, le=10, description="retries of a failed provider call")
    max_batch: int = Field(1024, ge=1)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)

    @field_validator("providers")
    @classmethod
    def _providers(cls, v: str) -> str:
        parse_providers(v)
        return v

    def provider_urls(self) -> dict[str, str]:
        return parse_providers(self.providers)


def parse_providers(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, url = part.partition("=")
        if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
            raise ValueError(f"{part!r} is not name=http://host:port")
        out[name.strip()] = url.strip().rstrip("/")
    if not out:
        raise ValueError("no providers; expected name=url,name=url,...")
    return out


class ProviderFailure(Exception):
    """A provider call failed in a way worth retrying (connection, timeout, 5xx)."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


class OrchestratorState:
    def __init__(self, settings: OrchestratorSettings):
        self.settings = settings
        self.providers = settings.provider_urls()
        self.admin_token = read_token_file(settings.admin_token_file,
                                           "QUMOS_ORCH_ADMIN_TOKEN_FILE")
        self.tokens: dict[str, str] = {}
        for name in self.providers:
            self.tokens[name] = read_token_file(settings.tokens_dir / name,
                                                f"QUMOS_ORCH_TOKENS_DIR ({name})")
        self.models_dir = settings.data_dir / "models"
        self.models: dict[str, ModelSpec] = {}
        self.problems: list[str] = []
        self.client: httpx.AsyncClient | None = None
        self.ready = False

    def load_models(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        for p in sorted(self.models_dir.glob("*.json")):
            try:
                spec = ModelSpec.model_validate_json(p.read_bytes())
                self.models[spec.name] = spec
            except (ValidationError, OSError) as e:
                self.problems.append(f"{p.name}: {str(e).splitlines()[0]}")

    def model(self, name: str) -> ModelSpec:
        spec = self.models.get(name)
        if spec is None:
            raise ServiceError(404, "not_found", f"model: {name!r} is not registered; "
                               f"registered: {sorted(self.models)}", "model")
        return spec

    # ----- one provider call --------------------------------------------------------------
    async def _call_once(self, provider: str, fid: str, body: bytes, n_rows: int,
                         n_out: int) -> np.ndarray:
        url = f"{self.providers[provider]}/v1/fragments/{fid}/execute"
        where = f"provider {provider} (fragment {fid})"
        try:
            resp = await self.client.post(url, content=body, headers={
                "Authorization": f"Bearer {self.tokens[provider]}",
                "Content-Type": "application/json"})
        except httpx.TimeoutException as e:
            raise ProviderFailure(504, "provider_timeout", f"{where} did not answer within "
                                  f"{self.settings.timeout_s}s ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise ProviderFailure(503, "provider_unavailable", f"{where} is unreachable at "
                                  f"{self.providers[provider]} ({type(e).__name__}: {e})") from None
        if resp.status_code >= 500:
            raise ProviderFailure(503 if resp.status_code == 503 else 502,
                                  "provider_unavailable" if resp.status_code == 503
                                  else "provider_error",
                                  f"{where} answered HTTP {resp.status_code}: "
                                  f"{_provider_message(resp)}")
        if resp.status_code != 200:
            # 4xx: our request or its configuration is wrong; retrying will not help.
            raise ServiceError(502, "provider_error", f"{where} refused the call with HTTP "
                               f"{resp.status_code}: {_provider_message(resp)}", "provider")
        return self._validate(resp.content, provider, fid, n_rows, n_out)

    def _validate(self, content: bytes, provider: str, fid: str, n_rows: int,
                  n_out: int) -> np.ndarray:
        where = f"provider {provider} (fragment {fid})"

        def bad(why: str) -> ServiceError:
            return ServiceError(502, "bad_provider_answer", f"{where} sent an invalid "
                                f"answer: {why}", "provider")

        try:
            ans = ExecuteResponse.model_validate_json(content)
        except ValidationError as e:
            raise bad(describe_validation_error(e)[1]) from None
        if ans.provider != provider or ans.fragment_id != fid:
            raise bad(f"it answered as {ans.provider!r} for {ans.fragment_id!r}")
        if len(ans.outputs) != n_rows or any(len(r) != n_out for r in ans.outputs):
            shape = (len(ans.outputs), {len(r) for r in ans.outputs})
            raise bad(f"outputs has shape {shape}; expected ({n_rows}, {n_out})")
        out = np.asarray(ans.outputs, dtype=float)
        if np.abs(out).max(initial=0.0) > 1 + OUTPUT_TOLERANCE:
            raise bad(f"outputs has value {float(np.abs(out).max())}; expectation values "
                      "lie in [-1, 1]")
        return np.clip(out, -1.0, 1.0)

    async def execute(self, spec: ModelSpec, k: int, angles: np.ndarray, shots: int | None,
                      seed: int | None) -> np.ndarray:
        provider = spec.placement[k]
        fid = fragment_id(spec.name, k)
        if provider not in self.providers:
            raise ServiceError(503, "provider_unavailable", f"provider {provider} (fragment "
                               f"{fid}) has no URL in QUMOS_ORCH_PROVIDERS", "provider")
        body: dict = {"inputs": angles.tolist()}
        if shots is not None:
            body["shots"] = shots
            if seed is not None:
                body["seed"] = seed + k
        payload = json.dumps(body).encode()
        n_out = spec.fragments[k].n_qubits
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.retries + 1),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(lambda e: isinstance(e, ProviderFailure)),
            reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._call_once(provider, fid, payload, len(angles), n_out)
        except ProviderFailure as e:
            raise ServiceError(e.status, e.kind, e.message, "provider") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def predict(self, spec: ModelSpec, raw: np.ndarray, shots: int | None,
                      seed: int | None) -> np.ndarray:
        features = preprocess(raw, spec.preprocess)
        h = await self.execute(spec, 0, features, shots, seed)
        for k, g in enumerate(spec.glue):
            h = await self.execute(spec, k + 1, glue_forward(g, h, features), shots, seed)
        return softmax(head_forward(spec.head, h))


def _provider_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return resp.text[:200] or "(empty body)"


def _model_info(spec: ModelSpec) -> ModelInfo:
    return ModelInfo(name=spec.name, dataset=spec.dataset, task=spec.task, classes=spec.classes,
                     n_fragments=spec.n_fragments, placement=spec.placement,
                     input_shape=[-1, spec.preprocess.n_raw])


def _check_instances(state: OrchestratorState, spec: ModelSpec, rows: list[list[float]],
                     field: str) -> np.ndarray:
    n = spec.preprocess.n_raw
    if not rows:
        raise ServiceError(422, "validation_error", f"{field}: empty batch; send 1 to "
                           f"{state.settings.max_batch} images of {n} values", field)
    if len(rows) > state.settings.max_batch:
        raise ServiceError(413, "batch_too_large", f"{field}: {len(rows)} images; allowed: at "
                           f"most {state.settings.max_batch} per call", field)
    for i, r in enumerate(rows):
        if len(r) != n:
            h, w = spec.preprocess.image_shape
            raise ServiceError(422, "validation_error", f"{field}[{i}]: has {len(r)} values; "
                               f"model {spec.name} takes {n} ({h}x{w} image, row-major)",
                               f"{field}[{i}]")
    return np.asarray(rows, dtype=float)


def create_app(settings: OrchestratorSettings | None = None,
               transport: httpx.AsyncBaseTransport | None = None,
               mounts: dict[str, httpx.AsyncBaseTransport] | None = None) -> FastAPI:
    """`transport`/`mounts` replace the network for in-process tests (httpx.ASGITransport)."""
    settings = load_settings(OrchestratorSettings, settings)
    state = OrchestratorState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import anyio

        await anyio.to_thread.run_sync(state.load_models)
        t = settings.timeout_s
        state.client = httpx.AsyncClient(
            timeout=httpx.Timeout(t, connect=min(5.0, t)),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            transport=transport, mounts=mounts)
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            await state.client.aclose()

    app = FastAPI(title="QuMoS orchestrator", lifespan=lifespan)
    app.state.orchestrator = state
    install_common(app, settings.max_body_bytes)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not state.ready:
            raise ServiceError(503, "not_ready", "the orchestrator is starting")
        return {"status": "ready", "models": sorted(state.models),
                "providers": sorted(state.providers), "problems": state.problems}

    # ----- models -----------------------------------------------------------------------
    @app.put("/v1/models/{name}", status_code=201)
    async def register(name: str, request: Request):
        check_bearer(request, state.admin_token)
        body = await request.body()
        try:
            spec = ModelSpec.model_validate_json(body or b"null")
        except ValidationError as e:
            raise ServiceError(422, "validation_error", format_validation_error(e),
                               describe_validation_error(e)[0]) from None
        if spec.name != name:
            raise ServiceError(422, "validation_error", f"name: the path says {name!r} but the "
                               f"model is {spec.name!r}", "name")
        for k, f in enumerate(spec.fragments):
            if f.params is not None:
                raise ServiceError(422, "validation_error", f"fragments[{k}].params: the "
                                   "orchestrator never holds fragment weights; send the company "
                                   "part (company.json)", f"fragments[{k}].params")
        for k, g in enumerate(spec.glue):
            if g.weight is None or g.bias is None:
                raise ServiceError(422, "validation_error", f"glue[{k}]: untrained (weight or "
                                   "bias missing)", f"glue[{k}]")
        if spec.head.kind == "linear" and spec.head.weight is None:
            raise ServiceError(422, "validation_error", "head: untrained linear head", "head")
        unknown = [p for p in spec.placement if p not in state.providers]
        if unknown:
            raise ServiceError(422, "validation_error", f"placement: {unknown} not among this "
                               f"orchestrator's providers {sorted(state.providers)}",
                               "placement")
        import anyio

        await anyio.to_thread.run_sync(atomic_write, state.models_dir / f"{name}.json",
                                       spec.model_dump_json(indent=1).encode())
        state.models[name] = spec
        return json_response(_model_info(spec), status=201)

    @app.get("/v1/models")
    async def list_models():
        return {"models": [_model_info(s).model_dump() for _, s in sorted(state.models.items())]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        return json_response(_model_info(state.model(name)))

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, request: Request):
        spec = state.model(name)
        req = await parse_body(request, PredictRequest)
        raw = _check_instances(state, spec, req.instances, "instances")
        probs = await state.predict(spec, raw, req.shots, req.seed)
        idx = probs.argmax(axis=1)
        return json_response(PredictResponse(
            model=name, probabilities=probs.tolist(), predictions=idx.tolist(),
            labels=[spec.classes[i] for i in idx]))

    # ----- Open Inference Protocol v2 ---------------------------------------------------
    @app.get("/v2/health/live")
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready():
        if not state.ready:
            raise ServiceError(503, "not_ready", "the orchestrator is starting")
        return {"ready": True}

    @app.get("/v2/models/{name}")
    async def v2_metadata(name: str):
        spec = state.model(name)
        return {"name": name, "versions": ["1"], "platform": "qumos-distributed-qnn",
                "inputs": [{"name": "images", "datatype": "FP32",
                            "shape": [-1, spec.preprocess.n_raw]}],
                "outputs": [{"name": "probabilities", "datatype": "FP64",
                             "shape": [-1, len(spec.classes)]},
                            {"name": "labels", "datatype": "INT64", "shape": [-1]}]}

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(name: str):
        state.model(name)
        return {"name": name, "ready": state.ready}

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, request: Request):
        spec = state.model(name)
        req = await parse_body(request, V2InferRequest)
        if len(req.inputs) != 1:
            raise ServiceError(422, "validation_error", f"inputs: {len(req.inputs)} tensors; "
                               "send exactly one (the images)", "inputs")
        t = req.inputs[0]
        if t.datatype not in ("FP32", "FP64"):
            raise ServiceError(422, "validation_error", f"inputs[0].datatype: {t.datatype!r}; "
                               "allowed: FP32, FP64", "inputs[0].datatype")
        n = spec.preprocess.n_raw
        if len(t.shape) != 2 or t.shape[1] != n or t.shape[0] < 1:
            raise ServiceError(422, "validation_error", f"inputs[0].shape: {t.shape}; "
                               f"expected [batch, {n}]", "inputs[0].shape")
        try:
            data = np.asarray(t.data, dtype=float).reshape(-1)
        except (ValueError, TypeError):
            raise ServiceError(422, "validation_error", "inputs[0].data: not a (nested) list "
                               "of numbers", "inputs[0].data") from None
        if data.size != t.shape[0] * n:
            raise ServiceError(422, "validation_error", f"inputs[0].data: {data.size} values; "
                               f"shape {t.shape} needs {t.shape[0] * n}", "inputs[0].data")
        if not np.isfinite(data).all():
            raise ServiceError(422, "validation_error", "inputs[0].data: contains NaN or "
                               "infinity; every value must be a finite number", "inputs[0].data")
        params = req.parameters or {}
        shots, seed = params.get("shots"), params.get("seed")
        for key, v in (("shots", shots), ("seed", seed)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0
                                  or (key == "shots" and not 1 <= v <= 1_000_000)):
                raise ServiceError(422, "validation_error", f"parameters.{key}: {v!r}; allowed: "
                                   "a non-negative integer (shots 1 to 1000000)",
                                   f"parameters.{key}")
        raw = _check_instances(state, spec, data.reshape(t.shape[0], n).tolist(), "inputs[0]")
        probs = await state.predict(spec, raw, shots, seed)
        idx = probs.argmax(axis=1)
        return json_response(V2InferResponse(model_name=name, model_version="1", id=req.id, outputs=[
            V2Tensor(name="probabilities", shape=list(probs.shape), datatype="FP64",
                     data=probs.reshape(-1).tolist()),
            V2Tensor(name="labels", shape=[len(idx)], datatype="INT64",
                     data=[spec.classes[i] for i in idx])]))

    return app


__all__ = ["OrchestratorSettings", "SettingsError", "create_app", "parse_providers"]
