"""The orchestrator in-process with three real provider apps mounted via ASGITransport:
the chain, the v2 protocol, registration rules, bad input, and misbehaving providers."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from qumos.datasets import load_task

from services.orchestrator.app import create_app
from services.orchestrator.settings import OrchestratorSettings
from tests.support.services import (
    company_stack,
    deploy_inprocess,
    running,
    torch_probs,
    write_token,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def test_data():
    return load_task("digits", 4, seed=0).test


async def test_predict_equals_torch_model(tmp_path, artifact, test_data):
    async with company_stack(tmp_path, artifact) as (c, admin, providers):
        await deploy_inprocess(c, admin, providers, artifact)
        raw = test_data.raw[:40]
        r = await c.post("/v1/models/digits4/predict", json={"instances": raw.tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        want = torch_probs(artifact.spec, test_data.x[:40])
        np.testing.assert_allclose(np.array(body["probabilities"]), want, atol=1e-4)
        assert body["predictions"] == want.argmax(1).tolist()
        assert body["labels"] == [artifact.spec.classes[i] for i in want.argmax(1)]
        # Open Inference Protocol v2 gives the same answer
        assert (await c.get("/v2/health/ready")).json() == {"ready": True}
        meta = (await c.get("/v2/models/digits4")).json()
        assert meta["inputs"][0]["shape"] == [-1, 64]
        r = await c.post(
            "/v2/models/digits4/infer",
            json={
                "id": "q1",
                "inputs": [
                    {
                        "name": "images",
                        "shape": [40, 64],
                        "datatype": "FP32",
                        "data": raw.reshape(-1).tolist(),
                    }
                ],
            },
        )
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert r.json()["id"] == "q1" and out["probabilities"]["shape"] == [40, 4]
        np.testing.assert_allclose(
            np.array(out["probabilities"]["data"]).reshape(40, 4), want, atol=1e-4
        )
        # every provider saw exactly its own fragment's traffic
        for k, name in enumerate(artifact.spec.placement):
            state = providers[name][0].state.provider
            entries = state.store.read_log()
            assert {e["fragment_id"] for e in entries} == {f"digits4.{k}"}
        listing = (await c.get("/v1/models")).json()["models"]
        assert listing[0]["placement"] == ["provider-a", "provider-b", "provider-c"]
    # the registration persists: a new orchestrator on the same data dir knows the model
    settings = OrchestratorSettings(
        data_dir=tmp_path / "orchestrator",
        tokens_dir=tmp_path / "tokens",
        admin_token_file=tmp_path / "admin_token",
        providers="provider-a=http://a,provider-b=http://b,provider-c=http://c",
    )
    async with running(create_app(settings)) as c:
        assert (await c.get("/v1/models/digits4")).json()["n_fragments"] == 3
    saved = json.loads((tmp_path / "orchestrator" / "models" / "digits4.json").read_text())
    assert all(f["params"] is None for f in saved["fragments"])


async def test_registration_rules(tmp_path, artifact):
    async with company_stack(tmp_path, artifact) as (c, admin, providers):
        body = artifact.company_spec().model_dump_json()
        url = "/v1/models/digits4"
        assert (await c.put(url, content=body, headers={"Authorization": ""})).status_code == 401
        assert (
            await c.put(url, content=body, headers={"Authorization": "Bearer " + "y" * 40})
        ).status_code == 403
        h = {"Authorization": f"Bearer {admin}"}
        r = await c.put(url, content=artifact.spec.model_dump_json(), headers=h)  # with weights
        assert r.status_code == 422 and r.json()["error"]["field"] == "fragments[0].params"
        r = await c.put("/v1/models/other", content=body, headers=h)
        assert r.status_code == 422 and r.json()["error"]["field"] == "name"
        bad = artifact.company_spec().model_copy(
            update={"placement": ["provider-a", "provider-b", "provider-z"]}
        )
        r = await c.put(url, content=bad.model_dump_json(), headers=h)
        assert r.status_code == 422 and "provider-z" in r.json()["error"]["message"]
        r = await c.put(url, content=b'{"fragments": []}', headers=h)
        assert r.status_code == 422
        assert (await c.get("/v1/models")).json() == {"models": []}


async def test_bad_input(tmp_path, artifact, test_data):
    async with company_stack(tmp_path, artifact, max_batch=16, max_body_bytes=20000) as (
        c,
        admin,
        providers,
    ):
        await deploy_inprocess(c, admin, providers, artifact)
        url = "/v1/models/digits4/predict"
        h = {"Content-Type": "application/json"}

        async def err(resp, status, field):
            assert resp.status_code == status, resp.text
            if resp.url.path.startswith("/v2/"):  # the protocol's {"error": "<string>"}
                assert resp.json()["error"].startswith(field + ":"), resp.json()
                return resp.json()["error"]
            assert resp.json()["error"]["field"] == field, resp.json()
            return resp.json()["error"]["message"]

        await err(await c.post(url, content=b"[1,2", headers=h), 422, "body")
        msg = await err(await c.post(url, json={"instances": [[0.0] * 63]}), 422, "instances[0]")
        assert "64" in msg and "8x8" in msg
        await err(
            await c.post(url, content=b'{"instances": [[NaN' + b",1" * 63 + b"]]}", headers=h),
            422,
            "instances[0][0]",
        )
        await err(await c.post(url, json={"instances": []}), 422, "instances")
        await err(await c.post(url, json={"instances": [[0.0] * 64] * 17}), 413, "instances")
        await err(await c.post(url, json={"instances": [[0.0] * 64], "shots": -1}), 422, "shots")
        await err(
            await c.post("/v1/models/nope/predict", json={"instances": [[0.0] * 64]}), 404, "model"
        )
        await err(await c.post(url, content=b"[" + b"0," * 20000 + b"0]", headers=h), 413, "body")
        v2 = "/v2/models/digits4/infer"
        t = {"name": "images", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
        await err(
            await c.post(v2, json={"inputs": [t | {"shape": [1, 63]}]}), 422, "inputs[0].shape"
        )
        await err(
            await c.post(v2, json={"inputs": [t | {"data": [0.0] * 63}]}), 422, "inputs[0].data"
        )
        await err(
            await c.post(v2, json={"inputs": [t | {"datatype": "BYTES"}]}),
            422,
            "inputs[0].datatype",
        )
        await err(
            await c.post(v2, json={"inputs": [t], "parameters": {"shots": "many"}}),
            422,
            "parameters.shots",
        )
        # still serving correct answers
        r = await c.post(url, json={"instances": test_data.raw[:3].tolist()})
        np.testing.assert_allclose(
            r.json()["probabilities"], torch_probs(artifact.spec, test_data.x[:3]), atol=1e-4
        )


def _garbage(kind):
    def handler(request: httpx.Request) -> httpx.Response:
        n = len(json.loads(request.content)["inputs"])
        ok = {"provider": "provider-b", "fragment_id": "digits4.1", "shots": None, "seconds": 0.0}
        if kind == "range":
            return httpx.Response(200, json=ok | {"outputs": [[2.0, 0, 0, 0]] * n})
        if kind == "shape":
            return httpx.Response(200, json=ok | {"outputs": [[0.0, 0, 0]] * n})
        if kind == "rows":
            return httpx.Response(200, json=ok | {"outputs": [[0.0] * 4] * (n + 1)})
        if kind == "nan":
            return httpx.Response(
                200, content=json.dumps(ok | {"outputs": [[float("nan")] * 4] * n}).encode()
            )
        if kind == "json":
            return httpx.Response(200, content=b"<html>oops</html>")
        if kind == "impostor":
            return httpx.Response(
                200, json=ok | {"provider": "provider-x", "outputs": [[0.0] * 4] * n}
            )
        raise AssertionError(kind)

    return handler


@pytest.mark.parametrize("kind", ["range", "shape", "rows", "nan", "json", "impostor"])
async def test_garbage_provider_gives_502(tmp_path, artifact, test_data, kind):
    bad = httpx.MockTransport(_garbage(kind))
    async with company_stack(tmp_path, artifact, {"provider-b": bad}) as (c, admin, providers):
        await deploy_inprocess(c, admin, providers, artifact)
        r = await c.post(
            "/v1/models/digits4/predict", json={"instances": test_data.raw[:2].tolist()}
        )
        assert r.status_code == 502, r.text
        msg = r.json()["error"]["message"]
        assert "provider-b" in msg and "digits4.1" in msg


async def test_down_and_slow_providers(tmp_path, artifact, test_data):
    calls = []

    def down(request):
        calls.append(1)
        raise httpx.ConnectError("connection refused", request=request)

    def slow(request):
        raise httpx.ReadTimeout("timed out", request=request)

    async with company_stack(
        tmp_path, artifact, {"provider-c": httpx.MockTransport(down)}, retries=2
    ) as (c, admin, providers):
        await deploy_inprocess(c, admin, providers, artifact)
        r = await c.post(
            "/v1/models/digits4/predict", json={"instances": test_data.raw[:2].tolist()}
        )
        assert r.status_code == 503
        assert "provider-c" in r.json()["error"]["message"]
        assert "digits4.2" in r.json()["error"]["message"]
        assert len(calls) == 3  # one try and two retries
    async with company_stack(
        tmp_path / "t", artifact, {"provider-a": httpx.MockTransport(slow)}, retries=0
    ) as (c, admin, providers):
        await deploy_inprocess(c, admin, providers, artifact)
        r = await c.post(
            "/v1/models/digits4/predict", json={"instances": test_data.raw[:2].tolist()}
        )
        assert r.status_code == 504 and "provider-a" in r.json()["error"]["message"]


async def test_unreachable_provider_is_503_not_a_timeout(tmp_path, artifact, test_data):
    """No connection at all (a killed container's stale address) is 'unavailable' (503),
    not 'did not answer in time' (504)."""

    def unreachable(request):
        raise httpx.ConnectTimeout("connect timed out", request=request)

    async with company_stack(
        tmp_path, artifact, {"provider-b": httpx.MockTransport(unreachable)}, retries=0
    ) as (c, admin, providers):
        await deploy_inprocess(c, admin, providers, artifact)
        r = await c.post(
            "/v1/models/digits4/predict", json={"instances": test_data.raw[:2].tolist()}
        )
        assert r.status_code == 503, r.text
        msg = r.json()["error"]["message"]
        assert "provider-b" in msg and "unreachable" in msg and "digits4.1" in msg


def test_settings_errors(tmp_path, monkeypatch):
    from qumos.errors import SettingsError

    for v in ("DATA_DIR", "PROVIDERS", "TOKENS_DIR", "ADMIN_TOKEN_FILE"):
        monkeypatch.delenv(f"QUMOS_ORCH_{v}", raising=False)
    with pytest.raises(SettingsError, match="QUMOS_ORCH_PROVIDERS is required"):
        create_app()
    write_token(tmp_path / "admin")
    monkeypatch.setenv("QUMOS_ORCH_DATA_DIR", str(tmp_path / "o"))
    monkeypatch.setenv("QUMOS_ORCH_TOKENS_DIR", str(tmp_path / "tokens"))
    monkeypatch.setenv("QUMOS_ORCH_ADMIN_TOKEN_FILE", str(tmp_path / "admin"))
    monkeypatch.setenv("QUMOS_ORCH_PROVIDERS", "provider-a")
    with pytest.raises(SettingsError, match="QUMOS_ORCH_PROVIDERS"):
        create_app()
    monkeypatch.setenv("QUMOS_ORCH_PROVIDERS", "provider-a=http://127.0.0.1:1")
    with pytest.raises(SettingsError, match="provider-a"):  # no token file for it
        create_app()
