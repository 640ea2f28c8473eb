"""The provider app in-process (lifespan included): deploy, execute on Aer, auth, log,
reload after restart, bad input."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from qumos.quantum import statevector_expectations

from services.provider.app import create_app
from tests.support.services import provider_settings, running

pytestmark = pytest.mark.anyio


def auth(token):
    return {"Authorization": f"Bearer {token}"}


async def deploy(client, artifact, k, token):
    ff = artifact.fragment_file(k)
    return await client.put(
        f"/v1/fragments/{ff.fragment_id}", content=ff.model_dump_json(), headers=auth(token)
    )


async def test_deploy_execute_matches_statevector(tmp_path, artifact):
    s, token = provider_settings(tmp_path, "provider-a")
    frozen = gc.get_freeze_count()
    async with running(create_app(s)) as c:
        assert (await c.get("/readyz")).json()["status"] == "ready"
        # start-up heap frozen (no full-GC pauses over qiskit's objects), again after deploy
        assert gc.get_freeze_count() > frozen
        frozen = gc.get_freeze_count()
        r = await deploy(c, artifact, 0, token)
        assert r.status_code == 201, r.text
        assert gc.get_freeze_count() > frozen
        assert r.json()["fragment_id"] == "digits4.0"
        x = np.random.default_rng(1).uniform(0, np.pi, (5, 16))
        r = await c.post(
            "/v1/fragments/digits4.0/execute", json={"inputs": x.tolist()}, headers=auth(token)
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["provider"] == "provider-a" and body["fragment_id"] == "digits4.0"
        want = statevector_expectations(artifact.spec.fragments[0], x)
        np.testing.assert_allclose(np.array(body["outputs"]), want, atol=1e-6)
        listing = (await c.get("/v1/fragments")).json()
        assert listing["provider"] == "provider-a"
        assert [f["fragment_id"] for f in listing["fragments"]] == ["digits4.0"]
        meta = (await c.get("/v1/fragments/digits4.0")).json()
        assert meta["n_inputs"] == 16 and "params" not in meta
        metrics = (await c.get("/metrics")).text
        assert "http_requests_total" in metrics
    # the access log holds the batch an insider would see
    log = [line for line in (tmp_path / "provider-a" / "access.jsonl").read_text().splitlines()]
    assert len(log) == 1
    import json

    entry = json.loads(log[0])
    np.testing.assert_allclose(entry["inputs"], x)
    np.testing.assert_allclose(entry["outputs"], want, atol=1e-6)
    assert entry["fragment_id"] == "digits4.0" and entry["time"] > 0


async def test_shots_mode_is_seeded_and_close(tmp_path, artifact):
    s, token = provider_settings(tmp_path, "provider-a")
    async with running(create_app(s)) as c:
        await deploy(c, artifact, 0, token)
        x = np.random.default_rng(2).uniform(0, np.pi, (4, 16)).tolist()
        body = {"inputs": x, "shots": 4096, "seed": 7}
        r1 = (
            await c.post("/v1/fragments/digits4.0/execute", json=body, headers=auth(token))
        ).json()
        r2 = (
            await c.post("/v1/fragments/digits4.0/execute", json=body, headers=auth(token))
        ).json()
        assert r1["outputs"] == r2["outputs"] and r1["shots"] == 4096
        want = statevector_expectations(artifact.spec.fragments[0], np.array(x))
        np.testing.assert_allclose(np.array(r1["outputs"]), want, atol=0.08)
        assert not np.allclose(np.array(r1["outputs"]), want, atol=1e-9)


async def test_reload_after_restart(tmp_path, artifact):
    s, token = provider_settings(tmp_path, "provider-b")
    async with running(create_app(s)) as c:
        assert (await deploy(c, artifact, 1, token)).status_code == 201
    files = sorted(p.name for p in (tmp_path / "provider-b").rglob("*") if p.is_file())
    assert files == ["digits4.1.json", "provider.json"]
    async with running(create_app(s)) as c:  # a new process: same data dir, same token
        ready = (await c.get("/readyz")).json()
        assert ready["fragments"] == 1
        x = np.zeros((2, 16))
        r = await c.post(
            "/v1/fragments/digits4.1/execute", json={"inputs": x.tolist()}, headers=auth(token)
        )
        assert r.status_code == 200
        np.testing.assert_allclose(
            r.json()["outputs"], statevector_expectations(artifact.spec.fragments[1], x), atol=1e-6
        )


async def test_auth_refused(tmp_path, artifact):
    s, token = provider_settings(tmp_path, "provider-a")
    async with running(create_app(s)) as c:
        ff = artifact.fragment_file(0)
        r = await c.put("/v1/fragments/digits4.0", content=ff.model_dump_json())
        assert r.status_code == 401 and r.json()["error"]["field"] == "authorization"
        r = await c.put(
            "/v1/fragments/digits4.0", content=ff.model_dump_json(), headers=auth("x" * 40)
        )
        assert r.status_code == 403
        r = await c.put(
            "/v1/fragments/digits4.0",
            content=ff.model_dump_json(),
            headers={"Authorization": f"Basic {token}"},
        )
        assert r.status_code == 403
        assert not (tmp_path / "provider-a" / "fragments").exists()
        assert (await deploy(c, artifact, 0, token)).status_code == 201
        body = {"inputs": [[0.0] * 16]}
        assert (await c.post("/v1/fragments/digits4.0/execute", json=body)).status_code == 401
        assert (
            await c.post("/v1/fragments/digits4.0/execute", json=body, headers=auth(token + "x"))
        ).status_code == 403
        assert not (tmp_path / "provider-a" / "access.jsonl").exists()


async def test_bad_input(tmp_path, artifact):
    s, token = provider_settings(tmp_path, "provider-a", max_batch=8, max_body_bytes=4096)
    async with running(create_app(s)) as c:
        await deploy(c, artifact, 0, token)
        ex = "/v1/fragments/digits4.0/execute"
        h = auth(token) | {"Content-Type": "application/json"}

        async def err(resp, status, field):
            assert resp.status_code == status, resp.text
            e = resp.json()["error"]
            assert e["field"] == field, e
            return e["message"]

        msg = await err(await c.post(ex, content=b"{not json", headers=h), 422, "body")
        assert "JSON" in msg
        msg = await err(
            await c.post(ex, json={"inputs": [[0.0] * 15]}, headers=h), 422, "inputs[0]"
        )
        assert "15" in msg and "16" in msg
        msg = await err(
            await c.post(ex, content=b'{"inputs": [[NaN' + b", 0.0" * 15 + b"]]}", headers=h),
            422,
            "inputs[0][0]",
        )
        assert "finite" in msg
        await err(
            await c.post(ex, content=b'{"inputs": [[Infinity' + b", 0.0" * 15 + b"]]}", headers=h),
            422,
            "inputs[0][0]",
        )
        await err(await c.post(ex, json={"inputs": []}, headers=h), 422, "inputs")
        await err(await c.post(ex, json={"inputs": "abc"}, headers=h), 422, "inputs")
        await err(
            await c.post(ex, json={"inputs": [[0.0] * 16], "shots": 0}, headers=h), 422, "shots"
        )
        await err(
            await c.post(ex, json={"inputs": [[0.0] * 16], "bogus": 1}, headers=h), 422, "bogus"
        )
        msg = await err(
            await c.post(ex, json={"inputs": [[0.0] * 16] * 9}, headers=h), 413, "inputs"
        )
        assert "at most 8" in msg
        await err(
            await c.post("/v1/fragments/nope.0/execute", json={"inputs": [[0.0] * 16]}, headers=h),
            404,
            "fragment_id",
        )
        await err(await c.get("/v1/fragments/nope.0"), 404, "fragment_id")
        # too large by Content-Length, and by a chunked body without Content-Length
        await err(await c.post(ex, content=b"x" * 5000, headers=h), 413, "body")

        async def chunks():
            for _ in range(10):
                yield b" " * 1000

        await err(await c.post(ex, content=chunks(), headers=h), 413, "body")
        # a fragment that does not match its path or provider is refused
        ff = artifact.fragment_file(1)
        await err(
            await c.put("/v1/fragments/digits4.0", content=ff.model_dump_json(), headers=h),
            422,
            "fragment_id",
        )
        await err(
            await c.put("/v1/fragments/digits4.1", content=ff.model_dump_json(), headers=h),
            422,
            "provider",
        )
        # still up, fragment intact
        r = await c.post(ex, json={"inputs": [[0.1] * 16]}, headers=h)
        assert r.status_code == 200
        np.testing.assert_allclose(
            r.json()["outputs"],
            statevector_expectations(artifact.spec.fragments[0], np.full((1, 16), 0.1)),
            atol=1e-6,
        )


def test_missing_settings_name_the_variable(tmp_path, monkeypatch):
    from qumos.errors import SettingsError

    for var in ("QUMOS_PROVIDER_NAME", "QUMOS_PROVIDER_DATA_DIR", "QUMOS_PROVIDER_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QUMOS_PROVIDER_NAME", "provider-a")
    with pytest.raises(SettingsError, match="QUMOS_PROVIDER_DATA_DIR is required"):
        create_app()
    monkeypatch.setenv("QUMOS_PROVIDER_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("QUMOS_PROVIDER_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="QUMOS_PROVIDER_TOKEN_FILE"):
        create_app()


async def test_small_exact_batches_run_on_the_loop_others_in_threads(
    tmp_path, artifact, monkeypatch
):
    """INLINE_ROWS: exact batches up to that many rows run on the event loop's thread (no
    ~0.6 ms hand-off); larger batches and shots go to worker threads. Same answers."""
    import threading

    import qumos.quantum

    seen = []
    real_run = qumos.quantum.AerRunner.run

    def run(self, inputs, shots=None, seed=None):
        seen.append((len(inputs), shots, threading.current_thread() is loop_thread))
        return real_run(self, inputs, shots=shots, seed=seed)

    monkeypatch.setattr(qumos.quantum.AerRunner, "run", run)
    s, token = provider_settings(tmp_path, "provider-a", inline_rows=4)
    loop_thread = threading.current_thread()  # the test's loop runs the app in-process
    async with running(create_app(s)) as c:
        await deploy(c, artifact, 0, token)
        x = np.random.default_rng(3).uniform(0, np.pi, (6, 16))
        want = statevector_expectations(artifact.spec.fragments[0], x)
        for rows, shots in ((1, None), (4, None), (5, None), (2, 1000)):
            body = {"inputs": x[:rows].tolist()} | ({"shots": shots, "seed": 1} if shots else {})
            r = await c.post("/v1/fragments/digits4.0/execute", json=body, headers=auth(token))
            assert r.status_code == 200, r.text
            if shots is None:
                np.testing.assert_allclose(r.json()["outputs"], want[:rows], atol=1e-6)
    assert seen == [(1, None, True), (4, None, True), (5, None, False), (2, 1000, False)]


async def test_hot_route_errors_metrics_and_schema(tmp_path, artifact, monkeypatch):
    """execute's errors are the services' JSON errors
    (an unexpected exception is a logged 500 and the service stays up), its metrics carry
    the route template, and it stays in the OpenAPI schema."""
    import qumos.quantum

    s, token = provider_settings(tmp_path, "provider-a")
    async with running(create_app(s)) as c:
        await deploy(c, artifact, 0, token)
        url = "/v1/fragments/digits4.0/execute"
        body = {"inputs": [[0.1] * 16]}
        r = await c.post(url, json=body)
        assert r.status_code == 401 and r.json()["error"]["field"] == "authorization"
        r = await c.post("/v1/fragments/nope.0/execute", json=body, headers=auth(token))
        assert r.status_code == 404 and "nope.0" in r.json()["error"]["message"]
        r = await c.post(url, content=b"{not json", headers=auth(token))
        assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error"

        def boom(*a, **k):
            raise RuntimeError("simulator exploded")

        monkeypatch.setattr(qumos.quantum.AerRunner, "run", boom)
        r = await c.post(url, json=body, headers=auth(token))
        assert r.status_code == 500
        assert r.json()["error"] == {
            "type": "internal",
            "message": "internal error (RuntimeError); the service is still up",
        }
        monkeypatch.undo()
        r = await c.post(url, json=body, headers=auth(token))
        assert r.status_code == 200
        metrics = (await c.get("/metrics")).text
        for status in ("2xx", "4xx", "5xx"):
            assert (
                'http_requests_total{handler="/v1/fragments/{fragment_id}/execute",'
                f'method="POST",status="{status}"}}'
            ) in metrics
        assert (
            'http_request_duration_seconds_count{handler="/v1/fragments/{fragment_id}/'
            'execute",method="POST"} 5.0' in metrics
        )  # 401, 404, 422, 500, 200
        op = (await c.get("/openapi.json")).json()["paths"]["/v1/fragments/{fragment_id}/execute"][
            "post"
        ]
        assert "ExecuteRequest" in str(op["requestBody"]) and "200" in op["responses"]
