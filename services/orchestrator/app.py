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
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import os
import random
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import anyio
import httpx
import numpy as np
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from qumos import oip
from qumos.artifact import atomic_write, fragment_id
from qumos.chain import encode_inputs, glue_forward, head_forward, preprocess, softmax
from qumos.client import (
    CanaryRequest,
    ExecuteResponse,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    V2InferRequest,
    V2InferResponse,
    describe_validation_error,
    dump_json,
)
from qumos.defense.batching import Batcher
from qumos.defense.guard import Guard, Refusal
from qumos.defense.keys import key_id
from qumos.defense.monitor import MonitorConfig
from qumos.defense.policy import OutputPolicy, apply_policy
from qumos.defense.quota import Quota
from qumos.http11 import AsyncTransport
from qumos.spec import ModelSpec, format_validation_error, name_problem
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

log = logging.getLogger("qumos.orchestrator")
OUTPUT_TOLERANCE = 1e-6  # provider outputs must lie in [-1 - tol, 1 + tol]
CONNECT_TIMEOUT_S = 5.0  # a new connection to a provider (capped by timeout_s)
MAX_CONNECTIONS, MAX_PER_PROVIDER = 64, 32  # the provider connection pool
READY_PROBE_S = 2.0  # readiness: how long a provider may take to say it holds a fragment
READY_CACHE_S = 1.0  # readiness: a model's probe result is reused this long
MODEL_VERSION = "1"  # the one version of every model (Open Inference Protocol paths)


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
    max_inflight: int = Field(64, ge=1, description="requests in flight before 503")
    canaries_per_call: int = Field(4, ge=0, le=256, description="integrity canaries mixed "
                                   "into each provider call (when registered)")
    provider_max_batch: int = Field(1024, ge=2, description="most rows per provider call, "
                                    "canaries included (larger batches are split)")
    max_retry_after_s: float = Field(2.0, ge=0, description="cap on a provider's Retry-After")
    http_transport: Literal["qumos", "httpcore"] = Field(
        "qumos", description="what the pooled httpx.AsyncClient sends through: "
        "qumos.http11 (default, least CPU per call) or httpx's own httpcore")
    # ----- defences (qumos.defense, docs/defenses.md) -----
    allow_anonymous: bool = Field(False, description="serve predictions without an API key")
    anonymous_images_per_window: int | None = Field(None, ge=1, description="anonymous quota")
    anonymous_window_s: float = Field(60.0, gt=0, le=366 * 86400)
    monitor: Literal["off", "log", "throttle", "block"] = Field(
        "log", description="extraction monitor (PRADA) action when it flags a key")
    monitor_delta: float = Field(0.85, gt=0, lt=1, description="flag when Shapiro-Wilk W "
                                 "of the key's minimum distances < delta")
    monitor_min_queries: int = Field(100, ge=20, le=100_000)
    monitor_window: int = Field(2000, ge=20, le=100_000)
    monitor_throttle_s: float = Field(1.0, ge=0, le=60, description="delay per request of "
                                      "a flagged key (action throttle)")
    batch_window_ms: float = Field(0.0, ge=0, le=1000, description="cross-client dynamic "
                                   "batching: collect requests this long (0: off)")
    batch_max_rows: int = Field(256, ge=1, le=100_000, description="rows per batch")
    batch_max_inflight: int = Field(2, ge=1, le=64, description="batches of a model in "
                                    "flight at once; later requests keep collecting")
    dedup_rows: bool = Field(True, description="exact mode: identical rows of a provider "
                             "call are sent once, in a random order (an insider cannot mark "
                             "its rows by repeating them)")
    quota_flush_s: float = Field(0.5, gt=0, le=60, description="quota counters are written "
                                 "at most this often (and at shutdown)")

    @model_validator(mode="after")
    def _canary_room(self):
        if self.canaries_per_call >= self.provider_max_batch:
            raise ValueError(f"canaries_per_call ({self.canaries_per_call}) must be below "
                             f"provider_max_batch ({self.provider_max_batch})")
        return self

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
    """A provider call failed in a way worth retrying (connection, timeout, 5xx, 429)."""

    def __init__(self, status: int, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.retry_after = retry_after


class Canaries:
    """A model's registered canaries, as arrays (inputs, outputs) per fragment."""

    def __init__(self, req: CanaryRequest):
        self.tolerance, self.shots_z = req.tolerance, req.shots_z
        self.inputs = [np.asarray(f.inputs, dtype=float) for f in req.fragments]
        self.outputs = [np.asarray(f.outputs, dtype=float) for f in req.fragments]

    def allowed(self, expected: np.ndarray, shots: int | None) -> np.ndarray:
        if shots is None:
            return np.full_like(expected, self.tolerance)
        return self.shots_z * np.sqrt(np.clip(1 - expected**2, 0, 1) / shots) + 1.0 / shots


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return max(0.0, float(resp.headers.get("retry-after", "")))
    except ValueError:
        return None


def check_canaries(spec: ModelSpec, canaries: CanaryRequest) -> None:
    """422 naming the field unless the canaries fit the model's fragments."""
    def bad(field: str, why: str) -> ServiceError:
        return ServiceError(422, "validation_error", f"{field}: {why}", field)

    if len(canaries.fragments) != spec.n_fragments:
        raise bad("fragments", f"{len(canaries.fragments)} entries; model {spec.name} has "
                  f"{spec.n_fragments} fragments")
    for k, (c, f) in enumerate(zip(canaries.fragments, spec.fragments)):
        if len(c.inputs) != len(c.outputs):
            raise bad(f"fragments[{k}].outputs", f"{len(c.outputs)} rows for "
                      f"{len(c.inputs)} inputs")
        for i, row in enumerate(c.inputs):
            if len(row) != f.n_inputs:
                raise bad(f"fragments[{k}].inputs[{i}]", f"has {len(row)} values; fragment "
                          f"{k} takes {f.n_inputs}")
        for i, row in enumerate(c.outputs):
            if len(row) != f.n_qubits:
                raise bad(f"fragments[{k}].outputs[{i}]", f"has {len(row)} values; fragment "
                          f"{k} has {f.n_qubits} qubits")
            if any(abs(v) > 1 for v in row):
                raise bad(f"fragments[{k}].outputs[{i}]", "expectation values lie in [-1, 1]")


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
        self.canaries_dir = settings.data_dir / "canaries"
        self.models: dict[str, ModelSpec] = {}
        self.canaries: dict[str, Canaries] = {}
        self.problems: list[str] = []
        self.client: httpx.AsyncClient | None = None
        self.request_extensions: dict = {}  # {"timeout": the client's}, set with the client
        self._endpoints: dict[tuple[str, str], tuple[httpx.URL, list]] = {}
        self.ready = False
        self._readiness: dict[str, tuple[float, list[str]]] = {}  # model -> (time, problems)
        self.canary_key = secrets.token_bytes(32)  # replaced by the persisted key at load
        self.counters: dict = {}  # prometheus counters, set in create_app
        self.guard = Guard(settings.data_dir, settings.allow_anonymous, settings.monitor,
                           MonitorConfig(delta=settings.monitor_delta,
                                         min_queries=settings.monitor_min_queries,
                                         window=settings.monitor_window),
                           settings.monitor_throttle_s,
                           Quota(images_per_window=settings.anonymous_images_per_window,
                                 window_s=settings.anonymous_window_s))
        self.batcher = (Batcher(self._run_batch, settings.batch_window_ms / 1000,
                                settings.batch_max_rows, settings.batch_max_inflight,
                                self._batch_metrics) if settings.batch_window_ms > 0
                        else None)

    def count(self, name: str, **labels) -> None:
        c = self.counters.get(name)
        if c is not None:
            (c.labels(**labels) if labels else c).inc()

    def load_models(self) -> None:
        """Startup (worker thread): registered models, their canaries, the canary key. A
        read-only data directory is reported in `problems`, not fatal."""
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.problems.append(f"{self.models_dir}: {e.strerror}")
        key_path = self.settings.data_dir / "canary.key"
        try:
            if key_path.is_file():
                self.canary_key = key_path.read_bytes()
            else:
                fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(self.canary_key)
        except OSError as e:
            self.problems.append(f"{key_path}: {e.strerror}; using a key for this run only")
        try:
            self.guard.load()
        except (ValueError, OSError) as e:
            raise SettingsError(f"QUMOS_ORCH_DATA_DIR: {e}") from None
        for p in sorted(self.models_dir.glob("*.json")):
            try:
                spec = ModelSpec.model_validate_json(p.read_bytes())
                self.models[spec.name] = spec
            except (ValidationError, OSError) as e:
                self.problems.append(f"{p.name}: {str(e).splitlines()[0]}")
        for name in self.models:
            p = self.canaries_dir / f"{name}.json"
            if p.is_file():
                try:
                    self.canaries[name] = Canaries(CanaryRequest.model_validate_json(
                        p.read_bytes()))
                except (ValidationError, OSError) as e:
                    self.problems.append(f"canaries/{p.name}: {str(e).splitlines()[0]}")

    def model(self, name: str) -> ModelSpec:
        spec = self.models.get(name)
        if spec is None:
            raise ServiceError(404, "not_found", f"model: {name!r} is not registered; "
                               f"registered: {sorted(self.models)}", "model")
        return spec

    # ----- readiness ------------------------------------------------------------------------
    async def model_problems(self, spec: ModelSpec) -> list[str]:
        """Why `spec` cannot be served now (empty: it can): each provider must answer and
        hold its fragment. Probed concurrently, each within READY_PROBE_S; cached."""
        loop = asyncio.get_running_loop()
        hit = self._readiness.get(spec.name)
        if hit is not None and loop.time() - hit[0] < READY_CACHE_S:
            return hit[1]

        async def probe(k: int, provider: str) -> str | None:
            fid = fragment_id(spec.name, k)
            url = f"{self.providers[provider]}/v1/fragments/{fid}"
            try:
                async with asyncio.timeout(READY_PROBE_S):
                    resp = await self.client.get(url)
            except (TimeoutError, httpx.HTTPError) as e:
                return (f"{provider} (fragment {fid}) is unreachable at "
                        f"{self.providers[provider]} ({type(e).__name__})")
            if resp.status_code == 404:
                return f"{provider} does not hold fragment {fid} (deploy it)"
            if resp.status_code != 200:
                return f"{provider} (fragment {fid}) answered HTTP {resp.status_code}"
            return None

        found = await asyncio.gather(*(probe(k, p) for k, p in enumerate(spec.placement)))
        problems = [p for p in found if p]
        self._readiness[spec.name] = (loop.time(), problems)
        return problems

    async def not_ready(self) -> dict[str, list[str]]:
        """{model: problems} of every registered model that cannot be served now."""
        if not self.ready:
            return {"(service)": ["the orchestrator is starting"]}
        specs = list(self.models.values())
        found = await asyncio.gather(*(self.model_problems(s) for s in specs))
        return {s.name: p for s, p in zip(specs, found) if p}

    # ----- one provider call --------------------------------------------------------------
    def _endpoint(self, provider: str, fid: str) -> tuple[httpx.URL, list]:
        """The execute URL (parsed) and request headers for a fragment, made once."""
        hit = self._endpoints.get((provider, fid))
        if hit is None:
            url = httpx.URL(f"{self.providers[provider]}/v1/fragments/{fid}/execute")
            headers = [(b"Authorization", f"Bearer {self.tokens[provider]}".encode()),
                       (b"Content-Type", b"application/json")]
            hit = self._endpoints[(provider, fid)] = (url, headers)
        return hit

    async def _call_once(self, provider: str, fid: str, body: bytes, n_rows: int,
                         n_out: int) -> np.ndarray:
        where = f"provider {provider} (fragment {fid})"
        url, headers = self._endpoint(provider, fid)
        # httpx.Request + send: the client's timeouts, without merging base URL, default
        # headers and cookies on every call (none are used); URL parsed once per fragment
        request = httpx.Request("POST", url, content=body, headers=headers,
                                extensions=self.request_extensions)
        try:
            async with asyncio.timeout(self.settings.timeout_s):  # the whole call
                resp = await self.client.send(request)
        except httpx.ConnectTimeout:
            raise ProviderFailure(503, "provider_unavailable", f"{where} is unreachable at "
                                  f"{self.providers[provider]} (no connection within "
                                  f"{self.client.timeout.connect}s)") from None
        except TimeoutError:
            raise ProviderFailure(504, "provider_timeout", f"{where} did not answer within "
                                  f"{self.settings.timeout_s}s (deadline)") from None
        except httpx.TimeoutException as e:
            raise ProviderFailure(504, "provider_timeout", f"{where} did not answer within "
                                  f"{self.settings.timeout_s}s ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise ProviderFailure(503, "provider_unavailable", f"{where} is unreachable at "
                                  f"{self.providers[provider]} ({type(e).__name__}: {e})") from None
        if resp.status_code in (429, 503) and "retry-after" in resp.headers:
            ra = _retry_after(resp)
            raise ProviderFailure(503, "provider_overloaded", f"{where} is overloaded (HTTP "
                                  f"{resp.status_code}, Retry-After {resp.headers['retry-after']}"
                                  f"): {_provider_message(resp)}", retry_after=ra)
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
        """Fragment k on its provider; in exact mode (DEDUP_ROWS) each distinct row once,
        in a secret random order, the answers fanned back out."""
        if shots is None and self.settings.dedup_rows and len(angles) > 1:
            uniq, inverse = np.unique(angles, axis=0, return_inverse=True)
            if len(uniq) < len(angles):
                order = np.random.default_rng(secrets.randbits(128)).permutation(len(uniq))
                out = await self._execute_rows(spec, k, uniq[order], shots, seed)
                back = np.empty_like(out)
                back[order] = out
                return back[inverse.reshape(-1)]
        return await self._execute_rows(spec, k, angles, shots, seed)

    async def _execute_rows(self, spec: ModelSpec, k: int, angles: np.ndarray,
                            shots: int | None, seed: int | None) -> np.ndarray:
        """Split into calls of at most provider_max_batch rows, each carrying canaries
        when the model has them."""
        provider = spec.placement[k]
        fid = fragment_id(spec.name, k)
        if provider not in self.providers:
            raise ServiceError(503, "provider_unavailable", f"provider {provider} (fragment "
                               f"{fid}) has no URL in QUMOS_ORCH_PROVIDERS", "provider")
        can = self.canaries.get(spec.name)
        n_can = min(self.settings.canaries_per_call, len(can.inputs[k])) if can else 0
        step = self.settings.provider_max_batch - n_can
        parts = []
        for c, start in enumerate(range(0, len(angles), step)):
            part = angles[start:start + step]
            if not n_can:
                parts.append(await self._execute_call(spec, k, part, shots, seed))
                continue
            rnd = self._canary_random(spec.name, k, c, seed if shots is not None else None)
            pick = rnd.sample(range(len(can.inputs[k])), n_can)  # which canaries
            n = len(part) + n_can
            is_canary = np.zeros(n, dtype=bool)
            is_canary[rnd.sample(range(n), n_can)] = True  # where they go in the batch
            batch = np.empty((n, part.shape[1]))
            batch[~is_canary] = part
            batch[is_canary] = can.inputs[k][pick]
            out = await self._execute_call(spec, k, batch, shots, seed)
            self._check_canaries(spec, k, out[is_canary], can, pick, shots)
            parts.append(out[~is_canary])
        return np.concatenate(parts)

    def _canary_random(self, model: str, k: int, call: int, seed: int | None) -> random.Random:
        """A generator seeded afresh for this call: from 128 secret random bits, or, for a
        seeded request, from an HMAC of the request under the secret canary key (so a seeded
        shots-mode prediction is reproducible, and still unpredictable to a provider).
        `random.Random`, not numpy's: ~0.05 ms less per call, with the same seeding."""
        if seed is None:
            return random.Random(secrets.randbits(128))
        digest = hmac.new(self.canary_key, f"{model}|{k}|{call}|{seed}".encode(),
                          hashlib.sha256).digest()
        return random.Random(int.from_bytes(digest[:16], "big"))

    def _check_canaries(self, spec: ModelSpec, k: int, got: np.ndarray, can: Canaries,
                        pick: list[int], shots: int | None) -> None:
        expected = can.outputs[k][pick]
        err = np.abs(got - expected)
        bad_rows = (err > can.allowed(expected, shots)).any(axis=1)
        provider, fid = spec.placement[k], fragment_id(spec.name, k)
        self.count("canary_checks", provider=provider)
        if bad_rows.any():
            self.count("integrity_failures", provider=provider)
            log.error("integrity check failed: provider %s fragment %s, %d of %d canaries off "
                      "by up to %.3g", provider, fid, int(bad_rows.sum()), len(pick),
                      float(err.max()))
            raise ServiceError(502, "integrity_check_failed", f"provider {provider} (fragment "
                               f"{fid}) failed the integrity check: {int(bad_rows.sum())} of "
                               f"{len(pick)} canary rows differ from their known outputs by up "
                               f"to {float(err.max()):.3g}; its answers are not trusted and no "
                               "prediction is returned", "provider")

    async def _execute_call(self, spec: ModelSpec, k: int, angles: np.ndarray,
                            shots: int | None, seed: int | None) -> np.ndarray:
        provider = spec.placement[k]
        fid = fragment_id(spec.name, k)
        body: dict = {"inputs": np.ascontiguousarray(angles, dtype=float)}
        if shots is not None:
            body["shots"] = shots
            if seed is not None:
                body["seed"] = seed + k
        payload = dump_json(body)
        n_out = spec.fragments[k].n_qubits

        attempts = self.settings.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return await self._call_once(provider, fid, payload, len(angles), n_out)
            except ProviderFailure as e:
                failure = e
            if attempt < attempts:  # a provider's Retry-After (capped), else 0.05 s, 0.1 s, ...
                await anyio.sleep(min(failure.retry_after, self.settings.max_retry_after_s)
                                  if failure.retry_after is not None
                                  else min(0.05 * 2 ** (attempt - 1), 1.0))
        self.count("provider_failures", provider=provider)
        msg = failure.message
        if self.settings.retries:
            msg += f" (after {attempts} attempts)"
        raise ServiceError(failure.status, failure.kind, msg, "provider",
                           headers={"Retry-After": "1"} if failure.status == 503 else None)

    async def predict(self, spec: ModelSpec, raw: np.ndarray, shots: int | None,
                      seed: int | None) -> np.ndarray:
        features = preprocess(raw, spec.preprocess)
        if self.batcher is not None and shots is None:
            return await self.batcher.submit(spec.name, features)
        return await self.chain(spec, features, shots, seed)

    def _batch_metrics(self, waits: list[float], n_requests: int) -> None:
        h = self.counters.get("batch_wait")
        if h is not None:
            for w in waits:
                h.observe(w)
            self.counters["batch_requests"].observe(n_requests)

    async def _run_batch(self, name: str, features: np.ndarray) -> np.ndarray:
        return await self.chain(self.model(name), features, None, None)

    async def chain(self, spec: ModelSpec, features: np.ndarray, shots: int | None,
                    seed: int | None) -> np.ndarray:
        h = await self.execute(spec, 0, encode_inputs(spec, features), shots, seed)
        for k, g in enumerate(spec.glue):
            h = await self.execute(spec, k + 1, glue_forward(g, h, features), shots, seed)
        return softmax(head_forward(spec.head, h))

    async def serve(self, request: Request, spec: ModelSpec, raw: np.ndarray,
                    shots: int | None, seed: int | None) -> tuple[np.ndarray, np.ndarray,
                                                                  dict]:
        """A client's prediction through the defences: key and quota (401/403/429),
        throttle, the chain, the extraction monitor, the output policy. Returns (answers
        under the policy, label indices, RateLimit headers)."""
        try:
            client = self.guard.admit(request.headers.get("authorization"), spec.name,
                                      len(raw))
            if client.throttle_s:
                await anyio.sleep(client.throttle_s)
            probs = await self.predict(spec, raw, shots, seed)
            idx = probs.argmax(axis=1)
            self.guard.observe(client, spec.name, raw, idx)
        except Refusal as e:
            raise ServiceError(e.status, e.kind, e.message, "authorization"
                               if e.status in (401, 403) else "quota", headers=e.headers
                               ) from None
        return apply_policy(probs, spec.output_policy), idx, client.headers


def _provider_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return resp.text[:200] or "(empty body)"


def _model_info(spec: ModelSpec, canaries: Canaries | None = None) -> ModelInfo:
    return ModelInfo(name=spec.name, dataset=spec.dataset, task=spec.task, classes=spec.classes,
                     n_fragments=spec.n_fragments, placement=spec.placement,
                     input_shape=[-1, spec.preprocess.n_raw],
                     canaries=len(canaries.inputs[0]) if canaries else 0,
                     output_policy=spec.output_policy.model_dump(),
                     input_hiding=spec.input_transform is not None)


class KeyCreateRequest(BaseModel):
    """POST /v1/keys (admin): a client API key and its quota."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="who the key is for (letters, digits, _ . @ -)")
    images_per_window: int | None = Field(None, ge=1, le=10**12)
    window_s: float = Field(60.0, gt=0, le=366 * 86400)
    images_total: int | None = Field(None, ge=1, le=10**15)


def _waiting(waiting: dict[str, list[str]]) -> str:
    return "; ".join(f"{m}: {', '.join(p)}" if not m.startswith("(") else ", ".join(p)
                     for m, p in waiting.items())


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qumos")
    except PackageNotFoundError:
        return "0"


def _storage_error(path: Path, e: OSError) -> ServiceError:
    kind = "full" if e.errno == errno.ENOSPC else "not writable"
    return ServiceError(507, "insufficient_storage", f"data_dir: {path} is {kind} "
                        f"({e.strerror or e}); registered models keep serving", "data_dir")


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
    images = np.asarray(rows, dtype=float)
    try:
        oip.check_pixels(images, pixel_range(spec), field)
    except oip.OipError as e:
        raise ServiceError(422, "validation_error", str(e), e.field) from None
    return images


def pixel_range(spec: ModelSpec) -> tuple[float, float]:
    """The pixels a model takes: 0 to its dataset's largest value (digits 16, MNIST 255);
    others are refused (422), not clipped silently."""
    return 0.0, spec.preprocess.max_value


def create_app(settings: OrchestratorSettings | None = None,
               transport: httpx.AsyncBaseTransport | None = None,
               mounts: dict[str, httpx.AsyncBaseTransport] | None = None) -> FastAPI:
    """`transport`/`mounts` replace the network for in-process tests (httpx.ASGITransport)."""
    settings = load_settings(OrchestratorSettings, settings)
    state = OrchestratorState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await anyio.to_thread.run_sync(state.load_models)
        t = settings.timeout_s
        net = transport
        if net is None and mounts is None and settings.http_transport == "qumos":
            net = AsyncTransport(max_per_host=MAX_PER_PROVIDER)
        state.client = httpx.AsyncClient(
            timeout=httpx.Timeout(t, connect=min(CONNECT_TIMEOUT_S, t)),
            # limits of httpx's own transport (HTTP_TRANSPORT=httpcore); qumos.http11
            # caps each provider at MAX_PER_PROVIDER connections itself
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS,
                                max_keepalive_connections=MAX_PER_PROVIDER),
            transport=net, mounts=mounts)
        state.request_extensions = {"timeout": state.client.timeout.as_dict()}
        freeze_startup_heap()
        state.ready = True

        async def flush_quota():  # the quota counters, when changed, every QUOTA_FLUSH_S
            while True:
                await anyio.sleep(settings.quota_flush_s)
                try:
                    await anyio.to_thread.run_sync(state.guard.quota.flush)
                except OSError as e:
                    log.error("quota counters not saved: %s", e.strerror or e)

        flusher = asyncio.get_running_loop().create_task(flush_quota())
        try:
            yield
        finally:
            state.ready = False
            flusher.cancel()
            try:
                state.guard.quota.flush()
            except OSError as e:
                log.error("quota counters not saved at shutdown: %s", e.strerror or e)
            await state.client.aclose()

    app = FastAPI(title="QuMoS orchestrator", lifespan=lifespan)
    app.state.orchestrator = state
    install_common(app, settings.max_body_bytes, max_inflight=settings.max_inflight)
    from prometheus_client import Counter, Histogram

    reg = app.state.metrics_registry
    state.counters = {
        "canary_checks": Counter("qumos_orch_canary_checks", "provider calls whose canaries "
                                 "were checked", ["provider"], registry=reg),
        "integrity_failures": Counter("qumos_orch_integrity_failures", "provider calls that "
                                      "failed the canary check", ["provider"], registry=reg),
        "provider_failures": Counter("qumos_orch_provider_failures", "provider calls that "
                                     "failed after retries", ["provider"], registry=reg),
        "batch_wait": Histogram("qumos_orch_batch_wait_seconds", "dynamic batching: a "
                                "request's wait from arrival to dispatch", registry=reg,
                                buckets=(.0005, .001, .0015, .002, .0025, .003, .004, .005,
                                         .01, .025, .05, .1, .25, 1.0)),
        "batch_requests": Histogram("qumos_orch_batch_requests", "dynamic batching: requests "
                                    "per batch", registry=reg,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))}
    state.guard.counters = {
        "images": Counter("qumos_orch_key_images", "images predicted per client key (id)",
                          ["key"], registry=reg),
        "refused": Counter("qumos_orch_key_refused", "requests refused per key (id) and "
                           "reason", ["key", "reason"], registry=reg),
        "flagged": Counter("qumos_orch_key_flagged", "keys flagged by the extraction "
                           "monitor", ["key"], registry=reg)}
    document_request_bodies(app, {("/v1/models/{name}", "put"): ModelSpec,
                                  ("/v1/models/{name}/policy", "put"): OutputPolicy,
                                  ("/v1/keys", "post"): KeyCreateRequest,
                                  ("/v1/models/{name}/canaries", "put"): CanaryRequest,
                                  ("/v1/models/{name}/predict", "post"): PredictRequest,
                                  ("/v2/models/{name}/infer", "post"): V2InferRequest,
                                  ("/v2/models/{name}/versions/{version}/infer", "post"):
                                      V2InferRequest})
    serving = error_responses(401, 403, 404, 413, 422, 429, 502, 503, 504)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", responses=error_responses(503))
    async def readyz():
        waiting = await state.not_ready()
        if waiting:
            raise ServiceError(503, "not_ready", "not ready: " + _waiting(waiting))
        return {"status": "ready", "models": sorted(state.models),
                "providers": sorted(state.providers), "problems": state.problems}

    # ----- models -----------------------------------------------------------------------
    @app.put("/v1/models/{name}", status_code=201, response_model=ModelInfo,
             responses=error_responses(401, 403, 413, 422, 503, 507))
    async def register(name: str, request: Request):
        check_bearer(request, state.admin_token)
        problem = name_problem(name)
        if problem:
            raise ServiceError(422, "validation_error", f"name: {problem}", "name")
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
        t = spec.input_transform
        if t is not None and (t.weight is None or t.bias is None):
            raise ServiceError(422, "validation_error", "input_transform: untrained (weight "
                               "or bias missing)", "input_transform")
        unknown = [p for p in spec.placement if p not in state.providers]
        if unknown:
            raise ServiceError(422, "validation_error", f"placement: {unknown} not among this "
                               f"orchestrator's providers {sorted(state.providers)}",
                               "placement")
        def write():
            # new weights make old canaries wrong: they go first, the company re-registers
            (state.canaries_dir / f"{name}.json").unlink(missing_ok=True)
            atomic_write(state.models_dir / f"{name}.json",
                         spec.model_dump_json(indent=1).encode())

        try:
            await anyio.to_thread.run_sync(write)
        except OSError as e:
            raise _storage_error(settings.data_dir, e) from None
        state.canaries.pop(name, None)
        state._readiness.pop(name, None)
        state.models[name] = spec
        return json_response(_model_info(spec), status=201)

    @app.put("/v1/models/{name}/canaries", response_model=ModelInfo,
             responses=error_responses(401, 403, 404, 413, 422, 503, 507))
    async def register_canaries(name: str, request: Request):
        check_bearer(request, state.admin_token)
        spec = state.model(name)
        req = await parse_body(request, CanaryRequest)
        check_canaries(spec, req)
        try:
            await anyio.to_thread.run_sync(atomic_write, state.canaries_dir / f"{name}.json",
                                           req.model_dump_json().encode())
        except OSError as e:
            raise _storage_error(settings.data_dir, e) from None
        state.canaries[name] = Canaries(req)
        return json_response(_model_info(spec, state.canaries[name]))

    @app.put("/v1/models/{name}/policy", response_model=ModelInfo,
             responses=error_responses(401, 403, 404, 413, 422, 507))
    async def set_policy(name: str, request: Request):
        """Change a model's output policy (admin); canaries and fragments stay."""
        check_bearer(request, state.admin_token)
        spec = state.model(name)
        policy = await parse_body(request, OutputPolicy)
        try:
            new = ModelSpec.model_validate({**spec.model_dump(), "output_policy":
                                            policy.model_dump()})
        except ValidationError as e:
            raise ServiceError(422, "validation_error", format_validation_error(e),
                               "output_policy") from None
        try:
            await anyio.to_thread.run_sync(atomic_write, state.models_dir / f"{name}.json",
                                           new.model_dump_json(indent=1).encode())
        except OSError as e:
            raise _storage_error(settings.data_dir, e) from None
        state.models[name] = new
        return json_response(_model_info(new, state.canaries.get(name)))

    # ----- client API keys (admin) -------------------------------------------------------
    @app.post("/v1/keys", status_code=201, responses=error_responses(401, 403, 422, 507))
    async def create_key(request: Request):
        check_bearer(request, state.admin_token)
        req = await parse_body(request, KeyCreateRequest)
        quota = Quota(images_per_window=req.images_per_window, window_s=req.window_s,
                      images_total=req.images_total)
        try:
            key, rec = await anyio.to_thread.run_sync(state.guard.keys.create, req.name, quota)
        except ValueError as e:
            raise ServiceError(422, "validation_error", str(e), "name") from None
        except OSError as e:
            raise _storage_error(settings.data_dir, e) from None
        log.info("API key %s (%s) created", f"qk_{rec.id}", rec.name)
        return {"key": key, **rec.public(),
                "note": "the key is shown only now; the orchestrator keeps a salted hash"}

    @app.get("/v1/keys", responses=error_responses(401, 403))
    async def list_keys(request: Request):
        check_bearer(request, state.admin_token)
        return {"keys": [r.public() for r in state.guard.keys.keys.values()]}

    @app.get("/v1/keys/flagged", responses=error_responses(401, 403))
    async def flagged_keys(request: Request):
        check_bearer(request, state.admin_token)
        return {"action": settings.monitor, "flagged": state.guard.flagged()}

    @app.delete("/v1/keys/{key}", responses=error_responses(401, 403, 404, 422, 507))
    async def revoke_key(key: str, request: Request):
        check_bearer(request, state.admin_token)
        try:
            kid = key_id(key)
            rec = await anyio.to_thread.run_sync(state.guard.keys.revoke, kid)
        except ValueError as e:
            raise ServiceError(422, "validation_error", str(e), "key") from None
        except KeyError as e:
            raise ServiceError(404, "not_found", str(e.args[0]), "key") from None
        except OSError as e:
            raise _storage_error(settings.data_dir, e) from None
        log.info("API key %s (%s) revoked", f"qk_{rec.id}", rec.name)
        return rec.public()

    @app.get("/v1/models")
    async def list_models():
        return {"models": [_model_info(s, state.canaries.get(n)).model_dump()
                           for n, s in sorted(state.models.items())]}

    @app.get("/v1/models/{name}", response_model=ModelInfo, responses=error_responses(404))
    async def get_model(name: str):
        return json_response(_model_info(state.model(name), state.canaries.get(name)))

    @hot_route(app, "POST", "/v1/models/{name}/predict", response_model=PredictResponse,
               responses=serving)
    async def predict(name: str, request: Request):
        spec = state.model(name)
        req = await parse_body(request, PredictRequest)
        raw = _check_instances(state, spec, req.instances, "instances")
        shown, idx, headers = await state.serve(request, spec, raw, req.shots, req.seed)
        resp = json_response(PredictResponse(
            model=name, probabilities=shown.tolist() if shown.ndim == 2 else None,
            predictions=idx.tolist(), labels=[spec.classes[i] for i in idx]))
        resp.headers.update(headers)
        return resp

    # ----- Open Inference Protocol v2 ---------------------------------------------------
    oip_errors = error_responses(404, oip=True)
    oip_serving = error_responses(401, 403, 404, 413, 422, 429, 502, 503, 504, oip=True)

    def version(v: str | None) -> None:
        if v is not None and v != MODEL_VERSION:
            raise ServiceError(404, "not_found", f"version: {v!r} is not a version of this "
                               f"model; allowed: {MODEL_VERSION!r}", "version")

    @app.get("/v2")
    async def v2_server():
        return {"name": "qumos-orchestrator", "version": _package_version(),
                "extensions": oip.EXTENSIONS}

    @app.get("/v2/health/live")
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready", responses=error_responses(503, oip=True))
    async def v2_ready():
        waiting = await state.not_ready()
        if waiting:
            raise ServiceError(503, "not_ready", "not ready: " + _waiting(waiting))
        return {"ready": True}

    async def v2_metadata(name: str, version_: str | None = None):
        version(version_)
        spec = state.model(name)
        return {"name": name, "versions": [MODEL_VERSION], "platform": "qumos-distributed-qnn",
                "inputs": [{"name": oip.INPUT_NAME, "datatype": "FP32",
                            "shape": [-1, spec.preprocess.n_raw]}],
                "outputs": [{"name": "probabilities", "datatype": "FP64",
                             "shape": [-1, len(spec.classes)]},
                            {"name": "labels", "datatype": "INT64", "shape": [-1]}]}

    async def v2_model_ready(name: str, version_: str | None = None):
        version(version_)
        problems = await state.model_problems(state.model(name))
        if problems:
            raise ServiceError(503, "not_ready", f"model {name} is not ready: "
                               + "; ".join(problems))
        return {"name": name, "ready": True}

    async def v2_infer(name: str, request: Request, version_: str | None = None):
        version(version_)
        spec = state.model(name)
        try:
            call = oip.parse_infer(await request.body(), request.headers.get(oip.HEADER),
                                   spec.preprocess.n_raw, settings.max_batch, pixel_range(spec))
            oip.restrict_outputs(call, spec.output_policy.shows_probabilities,
                                 spec.output_policy.describe())
        except oip.OipError as e:
            raise ServiceError(e.status, "validation_error", str(e), e.field) from None
        shown, idx, limits = await state.serve(request, spec, call.images, call.shots,
                                               call.seed)
        labels = np.asarray(spec.classes)[idx]
        body, headers = oip.encode_infer(name, MODEL_VERSION, call, shown, labels)
        return Response(body, headers={**headers, **limits})

    @app.get("/v2/models/{name}", responses=oip_errors)
    async def v2_model(name: str):
        return await v2_metadata(name)

    @app.get("/v2/models/{name}/versions/{version}", responses=oip_errors)
    async def v2_model_version(name: str, version: str):
        return await v2_metadata(name, version)

    @app.get("/v2/models/{name}/ready", responses=error_responses(404, 503, oip=True))
    async def v2_ready_model(name: str):
        return await v2_model_ready(name)

    @app.get("/v2/models/{name}/versions/{version}/ready",
             responses=error_responses(404, 503, oip=True))
    async def v2_ready_model_version(name: str, version: str):
        return await v2_model_ready(name, version)

    binary_out = {200: {"content": {"application/octet-stream": {"schema": {
        "type": "string", "format": "binary"}}}, "description": "JSON, or JSON + binary "
        "tensor data (Inference-Header-Content-Length)"}}

    @hot_route(app, "POST", "/v2/models/{name}/infer", response_model=V2InferResponse,
               responses={**binary_out, **oip_serving})
    async def v2_infer_default(name: str, request: Request):
        return await v2_infer(name, request)

    @hot_route(app, "POST", "/v2/models/{name}/versions/{version}/infer",
               response_model=V2InferResponse, responses={**binary_out, **oip_serving})
    async def v2_infer_version(name: str, version: str, request: Request):
        return await v2_infer(name, request, version)

    return app


__all__ = ["OrchestratorSettings", "SettingsError", "create_app", "parse_providers"]
