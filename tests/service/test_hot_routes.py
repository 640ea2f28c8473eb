"""The hot routes' two paths (qumos.web.hot's fast path, and FastAPI's routing with
FAST_ROUTES=false) answer alike: success, every kind of error, and the real services'
predict/infer/execute."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, HTTPException, Request, Response
from qumos.datasets import load_task
from qumos.errors import ServiceError
from qumos.web import check_bearer, hot_route, install_common, parse_body
from qumos.wire import ExecuteRequest
from svc_helpers import company_stack, deploy_inprocess, torch_probs

pytestmark = pytest.mark.anyio
TOKEN = "t" * 20


def toy_app(fast: bool) -> FastAPI:
    app = FastAPI()
    install_common(app, 4096, max_inflight=8, fast_routes=fast)

    @hot_route(app, "POST", "/v1/things/{thing}/do")
    async def do(thing: str, request: Request):
        check_bearer(request, TOKEN)
        if thing == "teapot":
            raise HTTPException(418, "thing: a teapot", headers={"X-Why": "tea"})
        if thing == "gone":
            raise ServiceError(410, "gone", "thing: gone", "thing")
        if thing == "boom":
            raise RuntimeError("boom")
        req = await parse_body(request, ExecuteRequest)
        return Response(f'{{"rows": {len(req.inputs)}}}', media_type="application/json")

    return app


CASES = [  # (path, body, headers) -> the same answer on both paths
    ("/v1/things/a/do", {"inputs": [[1.0], [2.0]]}, True),
    ("/v1/things/a/do", {"inputs": [[1.0]]}, False),  # 401
    ("/v1/things/teapot/do", {}, True),  # HTTPException in a hot route: its own status
    ("/v1/things/gone/do", {}, True),
    ("/v1/things/boom/do", {}, True),  # 500 "internal", logged
    ("/v1/things/a/do", {"inputs": [["x"]]}, True),  # 422 naming the field
    ("/v1/things/a/do", {"inputs": [[0.0] * 2000]}, True),  # 413 body limit
]


async def _answers(app: FastAPI) -> list[tuple]:
    out = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://test") as c:
        for path, body, auth in CASES:
            r = await c.post(path, json=body,
                             headers={"Authorization": f"Bearer {TOKEN}"} if auth else {})
            out.append((r.status_code, r.json(), r.headers.get("x-why")))
        metrics = (await c.get("/metrics")).text
    assert 'handler="/v1/things/{thing}/do"' in metrics  # the route is known to the metrics
    return out


async def test_fast_and_fastapi_paths_answer_alike():
    fast, slow = await _answers(toy_app(True)), await _answers(toy_app(False))
    assert fast == slow
    codes = [a[0] for a in fast]
    assert codes == [200, 401, 418, 410, 500, 422, 413]
    assert fast[0][1] == {"rows": 2}
    assert fast[2] == (418, {"error": {"type": "http_error", "message": "thing: a teapot"}},
                       "tea")
    assert fast[4][1]["error"]["type"] == "internal"
    assert fast[5][1]["error"]["field"] == "inputs[0][0]"


def test_a_hot_route_is_registered_once():
    app = toy_app(True)
    paths = [r.path for r in app.routes if getattr(r, "path", "") == "/v1/things/{thing}/do"]
    assert paths == ["/v1/things/{thing}/do"]
    assert len(app.state.hot_routes) == 1 and app.state.hot_routes[0][2] is app.routes[-1]


async def test_services_without_the_fast_path(tmp_path, artifact):
    """The provider's execute and the orchestrator's predict and infer, served by FastAPI's
    routing (FAST_ROUTES=false everywhere): the same answers as the in-process model."""
    raw = load_task("digits", 4, seed=0).test
    async with company_stack(tmp_path, artifact, provider_kw={"fast_routes": False},
                             fast_routes=False) as (c, admin, prov):
        assert not any(m.cls.__name__ == "HotRoutes" for m in c._transport.app.user_middleware)
        await deploy_inprocess(c, admin, prov, artifact)
        r = await c.post("/v1/models/digits4/predict", json={"instances": raw.raw[:5].tolist()})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["probabilities"],
                                   torch_probs(artifact.spec, raw.x[:5]), atol=1e-4)
        r = await c.post("/v2/models/digits4/versions/1/infer", json={"inputs": [{
            "name": "images", "shape": [1, 64], "datatype": "FP64",
            "data": raw.raw[0].tolist()}]})
        assert r.status_code == 200, r.text
        r = await c.post("/v2/models/digits4/versions/2/infer", json={})
        assert r.status_code == 404 and "version" in r.json()["error"]
        r = await c.post("/v1/models/nope/predict", json={"instances": [[0.0] * 64]})
        assert r.status_code == 404 and r.json()["error"]["field"] == "model"
