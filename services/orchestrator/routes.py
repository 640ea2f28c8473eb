"""The orchestrator's HTTP routes: each checks the caller (a dependency, for the admin
routes; predict and infer check client API keys in `Orchestrator.serve`) and the body,
calls one method of `Orchestrator`, and returns its answer."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request, Response
from qumos import oip
from qumos.defense.policy import OutputPolicy
from qumos.spec import ModelSpec
from qumos.web import (
    add_health_routes,
    bearer,
    document_request_bodies,
    error_responses,
    json_response,
    parse_body,
)
from qumos.wire import (
    CanaryRequest,
    KeyCreateRequest,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    V2InferRequest,
    V2InferResponse,
)

from services.orchestrator.core import MODEL_VERSION, Orchestrator, check_version

BINARY_OUT = {
    200: {
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "JSON, or JSON + binary tensor data (Inference-Header-Content-Length)",
    }
}


def add_routes(app: FastAPI, orch: Orchestrator) -> None:
    document_request_bodies(
        app,
        {
            ("/v1/models/{name}", "put"): ModelSpec,
            ("/v1/models/{name}/policy", "put"): OutputPolicy,
            ("/v1/keys", "post"): KeyCreateRequest,
            ("/v1/models/{name}/canaries", "put"): CanaryRequest,
            ("/v1/models/{name}/predict", "post"): PredictRequest,
            ("/v2/models/{name}/infer", "post"): V2InferRequest,
            ("/v2/models/{name}/versions/{version}/infer", "post"): V2InferRequest,
        },
    )
    serving = error_responses(401, 403, 404, 413, 422, 429, 502, 503, 504)
    admin_only = [Depends(bearer(lambda: orch.admin_token))]

    add_health_routes(app, orch.readiness)

    # ----- models -----------------------------------------------------------------------
    @app.put(
        "/v1/models/{name}",
        status_code=201,
        response_model=ModelInfo,
        responses=error_responses(401, 403, 413, 422, 503, 507),
        dependencies=admin_only,
    )
    async def register(name: str, request: Request):
        return json_response(await orch.register(name, await request.body()), status=201)

    @app.put(
        "/v1/models/{name}/canaries",
        response_model=ModelInfo,
        responses=error_responses(401, 403, 404, 413, 422, 503, 507),
        dependencies=admin_only,
    )
    async def register_canaries(name: str, request: Request):
        orch.model(name)  # 404 before the body is read
        req = await parse_body(request, CanaryRequest)
        return json_response(await orch.register_canaries(name, req))

    @app.put(
        "/v1/models/{name}/policy",
        response_model=ModelInfo,
        responses=error_responses(401, 403, 404, 413, 422, 507),
        dependencies=admin_only,
    )
    async def set_policy(name: str, request: Request):
        """Change a model's output policy (admin); canaries and fragments stay."""
        orch.model(name)
        return json_response(await orch.set_policy(name, await parse_body(request, OutputPolicy)))

    @app.get("/v1/models")
    async def list_models():
        return orch.list_models()

    @app.get("/v1/models/{name}", response_model=ModelInfo, responses=error_responses(404))
    async def get_model(name: str):
        return json_response(orch.info(name))

    # ----- client API keys (admin) -----------------------------------------------------
    @app.post(
        "/v1/keys",
        status_code=201,
        responses=error_responses(401, 403, 422, 507),
        dependencies=admin_only,
    )
    async def create_key(request: Request):
        return await orch.create_key(await parse_body(request, KeyCreateRequest))

    @app.get("/v1/keys", responses=error_responses(401, 403), dependencies=admin_only)
    async def list_keys():
        return orch.list_keys()

    @app.get("/v1/keys/flagged", responses=error_responses(401, 403), dependencies=admin_only)
    async def flagged_keys():
        return orch.flagged_keys()

    @app.delete(
        "/v1/keys/{key}",
        responses=error_responses(401, 403, 404, 422, 507),
        dependencies=admin_only,
    )
    async def revoke_key(key: str):
        return await orch.revoke_key(key)

    # ----- predictions -----------------------------------------------------------------
    @app.post("/v1/models/{name}/predict", response_model=PredictResponse, responses=serving)
    async def predict(name: str, request: Request):
        orch.model(name)  # 404 before the body is read
        req = await parse_body(request, PredictRequest)
        answer, headers = await orch.predict_v1(name, req, request.headers.get("authorization"))
        resp = json_response(answer)
        resp.headers.update(headers)
        return resp

    # ----- Open Inference Protocol v2 --------------------------------------------------
    oip_errors = error_responses(404, oip=True)
    oip_serving = error_responses(401, 403, 404, 413, 422, 429, 502, 503, 504, oip=True)

    @app.get("/v2")
    async def v2_server():
        return {
            "name": "qumos-orchestrator",
            "version": _package_version(),
            "extensions": oip.EXTENSIONS,
        }

    @app.get("/v2/health/live")
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready", responses=error_responses(503, oip=True))
    async def v2_ready():
        await orch.require_ready()
        return {"ready": True}

    def metadata(name: str, version: str | None = None) -> dict:
        check_version(version)
        spec = orch.model(name)
        return {
            "name": name,
            "versions": [MODEL_VERSION],
            "platform": "qumos-distributed-qnn",
            "inputs": [
                {"name": oip.INPUT_NAME, "datatype": "FP32", "shape": [-1, spec.preprocess.n_raw]}
            ],
            "outputs": [
                {"name": "probabilities", "datatype": "FP64", "shape": [-1, len(spec.classes)]},
                {"name": "labels", "datatype": "INT64", "shape": [-1]},
            ],
        }

    @app.get("/v2/models/{name}", responses=oip_errors)
    async def v2_model(name: str):
        return metadata(name)

    @app.get("/v2/models/{name}/versions/{version}", responses=oip_errors)
    async def v2_model_version(name: str, version: str):
        return metadata(name, version)

    @app.get("/v2/models/{name}/ready", responses=error_responses(404, 503, oip=True))
    async def v2_ready_model(name: str):
        return await orch.model_readiness(name)

    @app.get(
        "/v2/models/{name}/versions/{version}/ready", responses=error_responses(404, 503, oip=True)
    )
    async def v2_ready_model_version(name: str, version: str):
        return await orch.model_readiness(name, version)

    async def infer(name: str, version: str | None, request: Request) -> Response:
        body, headers = await orch.infer_v2(
            name,
            version,
            await request.body(),
            request.headers.get(oip.HEADER),
            request.headers.get("authorization"),
        )
        return Response(body, headers=headers)

    @app.post(
        "/v2/models/{name}/infer",
        response_model=V2InferResponse,
        responses={**BINARY_OUT, **oip_serving},
    )
    async def v2_infer(name: str, request: Request):
        return await infer(name, None, request)

    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        response_model=V2InferResponse,
        responses={**BINARY_OUT, **oip_serving},
    )
    async def v2_infer_version(name: str, version: str, request: Request):
        return await infer(name, version, request)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qumos")
    except PackageNotFoundError:
        return "0"
