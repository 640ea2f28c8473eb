"""The orchestrator's logic: registration of models, canaries, policies and client keys;
a prediction through the defences (key, quota, monitor, output policy), the chain of
provider calls (`qumos.chain`, the same chain as in-process), dynamic batching and row
dedup. No web framework here: `routes.py` maps requests to these methods; persistence is
`registry.py`, provider HTTP `providers.py`, canaries `canaries.py`."""

from __future__ import annotations

import asyncio
import logging
import secrets

import anyio
import numpy as np
from pydantic import ValidationError
from qumos import oip
from qumos.chain import adrive, head_forward, numpy_steps, preprocess, softmax
from qumos.config import read_token_file
from qumos.defense.batching import Batcher
from qumos.defense.guard import Guard, Refusal
from qumos.defense.keys import key_id
from qumos.defense.monitor import MonitorConfig
from qumos.defense.policy import OutputPolicy, apply_policy
from qumos.defense.quota import Quota
from qumos.errors import ServiceError, SettingsError
from qumos.spec import ModelSpec, name_problem
from qumos.wire import (
    CanaryRequest,
    KeyCreateRequest,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    describe_validation_error,
    format_validation_error,
)

from services.orchestrator.canaries import Integrity, check_canaries
from services.orchestrator.providers import Providers
from services.orchestrator.registry import Registry, storage_error
from services.orchestrator.settings import OrchestratorSettings

log = logging.getLogger("qumos.orchestrator")
MODEL_VERSION = "1"  # the one version of every model (Open Inference Protocol paths)


class Orchestrator:
    def __init__(self, settings: OrchestratorSettings):
        self.settings = settings
        urls = settings.provider_urls()
        self.admin_token = read_token_file(settings.admin_token_file, "QUMOS_ORCH_ADMIN_TOKEN_FILE")
        tokens = {
            name: read_token_file(settings.tokens_dir / name, f"QUMOS_ORCH_TOKENS_DIR ({name})")
            for name in urls
        }
        self.providers = Providers(settings, tokens)
        self.registry = Registry(settings.data_dir)
        # the secret key is replaced by the persisted one at load
        self.integrity = Integrity(
            secrets.token_bytes(32), settings.canaries_per_call, settings.provider_max_batch
        )
        self.ready = False
        self.guard = Guard(
            settings.data_dir,
            settings.allow_anonymous,
            settings.monitor,
            MonitorConfig(
                delta=settings.monitor_delta,
                min_queries=settings.monitor_min_queries,
                window=settings.monitor_window,
            ),
            settings.monitor_throttle_s,
            Quota(
                images_per_window=settings.anonymous_images_per_window,
                window_s=settings.anonymous_window_s,
            ),
        )
        self.batch_metrics: dict = {}  # prometheus histograms, set by the app
        self.batcher = (
            Batcher(
                self._run_batch,
                settings.batch_window_ms / 1000,
                settings.batch_max_rows,
                settings.batch_max_inflight,
                self._batch_metrics,
            )
            if settings.batch_window_ms > 0
            else None
        )

    @property
    def models(self) -> dict[str, ModelSpec]:
        return self.registry.models

    @property
    def problems(self) -> list[str]:
        return self.registry.problems

    def load(self) -> None:
        """Startup (worker thread): registered models, their canaries, the canary key,
        the client keys and quota counters."""
        self.integrity.key = self.registry.load(self.integrity.key)
        try:
            self.guard.load()
        except (ValueError, OSError) as e:
            raise SettingsError(f"QUMOS_ORCH_DATA_DIR: {e}") from None

    def model(self, name: str) -> ModelSpec:
        return self.registry.model(name)

    # ----- readiness ------------------------------------------------------------------------
    async def not_ready(self) -> dict[str, list[str]]:
        """{model: problems} of every registered model that cannot be served now."""
        if not self.ready:
            return {"(service)": ["the orchestrator is starting"]}
        specs = list(self.models.values())
        found = await asyncio.gather(*(self.providers.model_problems(s) for s in specs))
        return {s.name: p for s, p in zip(specs, found) if p}

    async def require_ready(self) -> None:
        """503 naming what is missing unless every registered model can be served."""
        _raise_waiting(await self.not_ready())

    async def readiness(self) -> dict:
        """/readyz's body; 503 naming what is missing."""
        await self.require_ready()
        return {
            "status": "ready",
            "models": sorted(self.models),
            "providers": sorted(self.providers.urls),
            "problems": self.problems,
        }

    async def model_readiness(self, name: str, version: str | None = None) -> dict:
        check_version(version)
        problems = await self.providers.model_problems(self.model(name))
        if problems:
            raise ServiceError(
                503, "not_ready", f"model {name} is not ready: " + "; ".join(problems)
            )
        return {"name": name, "ready": True}

    # ----- registration (admin) -------------------------------------------------------------
    def info(self, name: str) -> ModelInfo:
        spec = self.model(name)
        can = self.registry.canaries.get(name)
        return ModelInfo(
            name=spec.name,
            dataset=spec.dataset,
            task=spec.task,
            classes=spec.classes,
            n_fragments=spec.n_fragments,
            placement=spec.placement,
            input_shape=[-1, spec.preprocess.n_raw],
            canaries=len(can.inputs[0]) if can else 0,
            output_policy=spec.output_policy.model_dump(),
            input_hiding=spec.input_transform is not None,
        )

    def list_models(self) -> dict:
        return {"models": [self.info(n).model_dump() for n in sorted(self.models)]}

    async def register(self, name: str, body: bytes) -> ModelInfo:
        """A model's company part (no fragment weights): 422 naming the field unless it
        is a complete, trained model placed on this orchestrator's providers."""
        problem = name_problem(name)
        if problem:
            raise ServiceError(422, "validation_error", f"name: {problem}", "name")
        try:
            spec = ModelSpec.model_validate_json(body or b"null")
        except ValidationError as e:
            raise ServiceError(
                422, "validation_error", format_validation_error(e), describe_validation_error(e)[0]
            ) from None
        if spec.name != name:
            raise ServiceError(
                422,
                "validation_error",
                f"name: the path says {name!r} but the model is {spec.name!r}",
                "name",
            )
        _check_company_part(spec, self.providers.urls)
        await self.registry.put_model(spec)
        self.providers.forget(name)
        return self.info(name)

    async def register_canaries(self, name: str, req: CanaryRequest) -> ModelInfo:
        check_canaries(self.model(name), req)
        await self.registry.put_canaries(name, req)
        return self.info(name)

    async def set_policy(self, name: str, policy: OutputPolicy) -> ModelInfo:
        """Change a model's output policy; canaries and fragments stay."""
        spec = self.model(name)
        try:
            new = ModelSpec.model_validate(
                {**spec.model_dump(), "output_policy": policy.model_dump()}
            )
        except ValidationError as e:
            raise ServiceError(
                422, "validation_error", format_validation_error(e), "output_policy"
            ) from None
        await self.registry.put_model(new, new_weights=False)
        return self.info(name)

    # ----- client API keys (admin) ----------------------------------------------------------
    async def create_key(self, req: KeyCreateRequest) -> dict:
        quota = Quota(
            images_per_window=req.images_per_window,
            window_s=req.window_s,
            images_total=req.images_total,
        )
        try:
            key, rec = await anyio.to_thread.run_sync(self.guard.keys.create, req.name, quota)
        except ValueError as e:
            raise ServiceError(422, "validation_error", str(e), "name") from None
        except OSError as e:
            raise storage_error(self.settings.data_dir, e) from None
        log.info("API key %s (%s) created", f"qk_{rec.id}", rec.name)
        return {
            "key": key,
            **rec.public(),
            "note": "the key is shown only now; the orchestrator keeps a salted hash",
        }

    def list_keys(self) -> dict:
        return {"keys": [r.public() for r in self.guard.keys.keys.values()]}

    def flagged_keys(self) -> dict:
        return {"action": self.settings.monitor, "flagged": self.guard.flagged()}

    async def revoke_key(self, key: str) -> dict:
        try:
            rec = await anyio.to_thread.run_sync(self.guard.keys.revoke, key_id(key))
        except ValueError as e:
            raise ServiceError(422, "validation_error", str(e), "key") from None
        except KeyError as e:
            raise ServiceError(404, "not_found", str(e.args[0]), "key") from None
        except OSError as e:
            raise storage_error(self.settings.data_dir, e) from None
        log.info("API key %s (%s) revoked", f"qk_{rec.id}", rec.name)
        return rec.public()

    # ----- predictions ----------------------------------------------------------------------
    async def predict_v1(
        self, name: str, req: PredictRequest, authorization: str | None
    ) -> tuple[PredictResponse, dict]:
        """POST /v1/models/{name}/predict: the answer and its RateLimit headers."""
        spec = self.model(name)
        raw = check_instances(spec, req.instances, self.settings.max_batch, "instances")
        shown, idx, headers = await self.serve(authorization, spec, raw, req.shots, req.seed)
        return PredictResponse(
            model=name,
            probabilities=shown.tolist() if shown.ndim == 2 else None,
            predictions=idx.tolist(),
            labels=[spec.classes[i] for i in idx],
        ), headers

    async def infer_v2(
        self,
        name: str,
        version: str | None,
        body: bytes,
        header_length: str | None,
        authorization: str | None,
    ) -> tuple[bytes, dict]:
        """POST /v2/models/{name}[/versions/{version}]/infer (qumos.oip): the body and
        headers of the answer."""
        check_version(version)
        spec = self.model(name)
        try:
            call = oip.parse_infer(
                body,
                header_length,
                spec.preprocess.n_raw,
                self.settings.max_batch,
                pixel_range(spec),
            )
            oip.restrict_outputs(
                call, spec.output_policy.shows_probabilities, spec.output_policy.describe()
            )
        except oip.OipError as e:
            raise ServiceError(e.status, "validation_error", str(e), e.field) from None
        shown, idx, limits = await self.serve(
            authorization, spec, call.images, call.shots, call.seed
        )
        labels = np.asarray(spec.classes)[idx]
        out, headers = oip.encode_infer(name, MODEL_VERSION, call, shown, labels)
        return out, {**headers, **limits}

    async def serve(
        self,
        authorization: str | None,
        spec: ModelSpec,
        raw: np.ndarray,
        shots: int | None,
        seed: int | None,
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """A client's prediction through the defences: key and quota (401/403/429),
        throttle, the chain, the extraction monitor, the output policy. Returns (answers
        under the policy, label indices, RateLimit headers)."""
        try:
            client = self.guard.admit(authorization, spec.name, len(raw))
            if client.throttle_s:
                await anyio.sleep(client.throttle_s)
            probs = await self.predict(spec, raw, shots, seed)
            idx = probs.argmax(axis=1)
            self.guard.observe(client, spec.name, raw, idx)
        except Refusal as e:
            raise ServiceError(
                e.status,
                e.kind,
                e.message,
                "authorization" if e.status in (401, 403) else "quota",
                headers=e.headers,
            ) from None
        return apply_policy(probs, spec.output_policy), idx, client.headers

    async def predict(
        self, spec: ModelSpec, raw: np.ndarray, shots: int | None, seed: int | None
    ) -> np.ndarray:
        features = preprocess(raw, spec.preprocess)
        if self.batcher is not None and shots is None:
            return await self.batcher.submit(spec.name, features)
        return await self.chain(spec, features, shots, seed)

    async def chain(
        self, spec: ModelSpec, features: np.ndarray, shots: int | None, seed: int | None
    ) -> np.ndarray:
        h = await adrive(
            numpy_steps(spec, features),
            lambda k, angles: self.execute(spec, k, angles, shots, seed),
        )
        return softmax(head_forward(spec.head, h))

    async def execute(
        self, spec: ModelSpec, k: int, angles: np.ndarray, shots: int | None, seed: int | None
    ) -> np.ndarray:
        """Fragment k on its provider, with canaries; in exact mode (DEDUP_ROWS) each
        distinct row once, in a secret random order, the answers fanned back out."""
        can = self.registry.canaries.get(spec.name)
        if shots is None and self.settings.dedup_rows and len(angles) > 1:
            uniq, inverse = np.unique(angles, axis=0, return_inverse=True)
            if len(uniq) < len(angles):
                order = np.random.default_rng(secrets.randbits(128)).permutation(len(uniq))
                out = await self.integrity.run(
                    self.providers.execute, spec, k, uniq[order], shots, seed, can
                )
                back = np.empty_like(out)
                back[order] = out
                return back[inverse.reshape(-1)]
        return await self.integrity.run(self.providers.execute, spec, k, angles, shots, seed, can)

    def _batch_metrics(self, waits: list[float], n_requests: int) -> None:
        h = self.batch_metrics.get("batch_wait")
        if h is not None:
            for w in waits:
                h.observe(w)
            self.batch_metrics["batch_requests"].observe(n_requests)

    async def _run_batch(self, name: str, features: np.ndarray) -> np.ndarray:
        return await self.chain(self.model(name), features, None, None)


def _check_company_part(spec: ModelSpec, providers: dict[str, str]) -> None:
    for k, f in enumerate(spec.fragments):
        if f.params is not None:
            raise ServiceError(
                422,
                "validation_error",
                f"fragments[{k}].params: the "
                "orchestrator never holds fragment weights; send the company "
                "part (company.json)",
                f"fragments[{k}].params",
            )
    for k, g in enumerate(spec.glue):
        if g.weight is None or g.bias is None:
            raise ServiceError(
                422,
                "validation_error",
                f"glue[{k}]: untrained (weight or bias missing)",
                f"glue[{k}]",
            )
    if spec.head.kind == "linear" and spec.head.weight is None:
        raise ServiceError(422, "validation_error", "head: untrained linear head", "head")
    t = spec.input_transform
    if t is not None and (t.weight is None or t.bias is None):
        raise ServiceError(
            422,
            "validation_error",
            "input_transform: untrained (weight or bias missing)",
            "input_transform",
        )
    unknown = [p for p in spec.placement if p not in providers]
    if unknown:
        raise ServiceError(
            422,
            "validation_error",
            f"placement: {unknown} not among this orchestrator's providers {sorted(providers)}",
            "placement",
        )


def check_version(v: str | None) -> None:
    if v is not None and v != MODEL_VERSION:
        raise ServiceError(
            404,
            "not_found",
            f"version: {v!r} is not a version of this model; allowed: {MODEL_VERSION!r}",
            "version",
        )


def check_instances(
    spec: ModelSpec, rows: list[list[float]], max_batch: int, field: str
) -> np.ndarray:
    n = spec.preprocess.n_raw
    if not rows:
        raise ServiceError(
            422,
            "validation_error",
            f"{field}: empty batch; send 1 to {max_batch} images of {n} values",
            field,
        )
    if len(rows) > max_batch:
        raise ServiceError(
            413,
            "batch_too_large",
            f"{field}: {len(rows)} images; allowed: at most {max_batch} per call",
            field,
        )
    for i, r in enumerate(rows):
        if len(r) != n:
            h, w = spec.preprocess.image_shape
            raise ServiceError(
                422,
                "validation_error",
                f"{field}[{i}]: has {len(r)} values; "
                f"model {spec.name} takes {n} ({h}x{w} image, row-major)",
                f"{field}[{i}]",
            )
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


def _raise_waiting(waiting: dict[str, list[str]]) -> None:
    if waiting:
        raise ServiceError(
            503,
            "not_ready",
            "not ready: "
            + "; ".join(
                f"{m}: {', '.join(p)}" if not m.startswith("(") else ", ".join(p)
                for m, p in waiting.items()
            ),
        )
