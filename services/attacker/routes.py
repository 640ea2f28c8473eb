"""The attacker's HTTP routes: each checks the caller (a dependency) and the body, calls
one method of `AttackerState`, and returns its answer."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from qumos.web import (
    add_health_routes,
    bearer,
    document_request_bodies,
    error_responses,
    parse_body,
)

from services.attacker.core import AttackerState
from services.attacker.models import AttackRequest, Job


def add_routes(app: FastAPI, state: AttackerState) -> None:
    document_request_bodies(app, {("/v1/attacks", "post"): AttackRequest})

    add_health_routes(app, state.readiness)

    @app.post(
        "/v1/attacks",
        status_code=202,
        response_model=Job,
        responses=error_responses(401, 403, 409, 413, 422, 503),
        dependencies=[Depends(bearer(lambda: state.admin_token))],
    )
    async def submit(request: Request):
        state.check_room()
        return await state.submit(await parse_body(request, AttackRequest))

    @app.get("/v1/attacks")
    async def list_jobs():
        return state.list_jobs()

    @app.get("/v1/attacks/{job_id}", response_model=Job, responses=error_responses(404))
    async def get_job(job_id: str):
        return state.job(job_id)
