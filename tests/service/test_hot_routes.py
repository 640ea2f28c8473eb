"""The routes on every prediction's path are ordinary FastAPI routes (their hand-written
fast path was removed: docs/performance.md): an HTTPException, a ServiceError, a bad body
and a bug each get their own status and the services' JSON error body, and the request
is counted under its route template."""

from __future__ import annotations

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from qumos.errors import ServiceError
from qumos.web import bearer, install_common, parse_body
from qumos.wire import ExecuteRequest

pytestmark = pytest.mark.anyio
TOKEN = "t" * 20


def toy_app() -> FastAPI:
    app = FastAPI()
    install_common(app, 4096, max_inflight=8)

    @app.post("/v1/things/{thing}/do", dependencies=[Depends(bearer(lambda: TOKEN))])
    async def do(thing: str, request: Request):
        if thing == "teapot":
            raise HTTPException(418, "thing: a teapot", headers={"X-Why": "tea"})
        if thing == "gone":
            raise ServiceError(410, "gone", "thing: gone", "thing")
        if thing == "boom":
            raise RuntimeError("boom")
        req = await parse_body(request, ExecuteRequest)
        return Response(f'{{"rows": {len(req.inputs)}}}', media_type="application/json")

    return app


async def test_every_kind_of_error_keeps_its_status():
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=toy_app()), base_url="http://test"
    ) as c:

        async def post(thing: str, body: dict, auth: bool = True) -> httpx.Response:
            return await c.post(
                f"/v1/things/{thing}/do",
                json=body,
                headers={"Authorization": f"Bearer {TOKEN}"} if auth else {},
            )

        r = await post("a", {"inputs": [[1.0], [2.0]]})
        assert (r.status_code, r.json()) == (200, {"rows": 2})
        r = await post("a", {"inputs": [[1.0]]}, auth=False)
        assert r.status_code == 401 and r.json()["error"]["field"] == "authorization"
        r = await post("teapot", {})  # an HTTPException raised in the route: its status
        assert (r.status_code, r.json(), r.headers["x-why"]) == (
            418,
            {"error": {"type": "http_error", "message": "thing: a teapot"}},
            "tea",
        )
        r = await post("gone", {})
        assert r.status_code == 410 and r.json()["error"]["field"] == "thing"
        r = await post("boom", {})  # a bug: 500 "internal", not raised to the server
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal"
        r = await post("a", {"inputs": [["x"]]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "inputs[0][0]"
        r = await post("a", {"inputs": [[0.0] * 2000]})
        assert r.status_code == 413
        metrics = (await c.get("/metrics")).text
    for status in ("2xx", "4xx", "5xx"):
        assert (
            'http_requests_total{handler="/v1/things/{thing}/do",method="POST",'
            f'status="{status}"}}'
        ) in metrics
