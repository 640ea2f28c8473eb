"""The provider's HTTP routes: each checks the caller (a dependency) and the body, calls
one method of `ProviderState`, and returns its answer."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request, Response
from qumos.artifact import FragmentFile
from qumos.web import (
    add_health_routes,
    bearer,
    document_request_bodies,
    error_responses,
    freeze_startup_heap,
    json_response,
    parse_body,
)
from qumos.wire import ExecuteRequest, ExecuteResponse, FragmentInfo, FragmentList

from services.provider.core import ProviderState


def add_routes(app: FastAPI, state: ProviderState) -> None:
    document_request_bodies(
        app,
        {
            ("/v1/fragments/{fragment_id}", "put"): FragmentFile,
            ("/v1/fragments/{fragment_id}/execute", "post"): ExecuteRequest,
        },
    )

    add_health_routes(app, state.readiness, provider=state.settings.name)
    orchestrator_only = [Depends(bearer(lambda: state.token))]

    @app.get("/v1/fragments", response_model=FragmentList)
    async def list_fragments():
        return json_response(state.listing())

    @app.get(
        "/v1/fragments/{fragment_id}", response_model=FragmentInfo, responses=error_responses(404)
    )
    async def get_fragment(fragment_id: str):
        return json_response(state.info(fragment_id))

    @app.put(
        "/v1/fragments/{fragment_id}",
        status_code=201,
        response_model=FragmentInfo,
        responses=error_responses(401, 403, 413, 422, 503, 507),
        dependencies=orchestrator_only,
    )
    async def deploy(fragment_id: str, request: Request):
        info = await state.deploy(fragment_id, await parse_body(request, FragmentFile))
        freeze_startup_heap()  # the new circuit and what transpiling loaded, too
        return json_response(info, status=201)

    @app.delete(
        "/v1/fragments/{fragment_id}",
        responses=error_responses(401, 403, 404, 503, 507),
        dependencies=orchestrator_only,
    )
    async def delete(fragment_id: str):
        return await state.delete(fragment_id)

    @app.post(
        "/v1/fragments/{fragment_id}/execute",
        response_model=ExecuteResponse,
        responses=error_responses(401, 403, 404, 413, 422, 503, 507),
        dependencies=orchestrator_only,
    )
    async def execute(fragment_id: str, request: Request):
        state.get(fragment_id)  # 404 before the body is read
        body = await state.execute(fragment_id, await parse_body(request, ExecuteRequest))
        return Response(body, media_type="application/json")
