"""Hardening, in process: integrity canaries against a lying provider, a stalled provider,
overload push-back (429/503 + Retry-After), and storage faults (disk full / read-only,
injected in process: we run as root, where chmod does not stop writes)."""

from __future__ import annotations

import asyncio
import errno

import httpx
import numpy as np
import pytest
from qumos.datasets import load_task
from qumos.deploy import make_canaries
from qumos.quantum import statevector_expectations

from tests.support.services import (
    company_stack,
    deploy_inprocess,
    provider_settings,
    running,
    torch_probs,
)
from tests.support.tamper import TamperingTransport

pytestmark = pytest.mark.anyio
PRED = "/v1/models/digits4/predict"


@pytest.fixture(scope="module")
def data():
    return load_task("digits", 4, seed=0)


async def register_canaries(c, admin, artifact, data, n=16):
    req = make_canaries(artifact.spec, data.train.raw[:n])
    r = await c.put(
        "/v1/models/digits4/canaries",
        content=req.model_dump_json(),
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["canaries"] == n
    return req


async def test_canaries_pass_honest_and_catch_tampering(tmp_path, artifact, data):
    lie = {}

    def liar(app):
        lie["t"] = TamperingTransport(app, delta=0.0, fraction=1.0, seed=1)
        return lie["t"]

    raw, want = data.test.raw[:12], torch_probs(artifact.spec, data.test.x[:12])
    async with company_stack(tmp_path, artifact, {"provider-b": liar}) as (c, admin, prov):
        await deploy_inprocess(c, admin, prov, artifact)
        await register_canaries(c, admin, artifact, data)
        # honest (delta 0): right answers, and the provider saw 12 + 4 canary rows per call
        r = await c.post(PRED, json={"instances": raw.tolist()})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["probabilities"], want, atol=1e-4)
        log = prov["provider-b"][0].state.provider.store.read_log()
        assert len(log[-1]["inputs"]) == 16
        # a lie below the exact-mode tolerance is not an error (and changes nothing)
        lie["t"].delta = 1e-8
        assert (await c.post(PRED, json={"instances": raw.tolist()})).status_code == 200
        # every row off by 0.02: refused, naming the provider and fragment
        lie["t"].delta = 0.02
        r = await c.post(PRED, json={"instances": raw.tolist()})
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert err["type"] == "integrity_check_failed" and err["field"] == "provider"
        assert "provider-b" in err["message"] and "digits4.1" in err["message"]
        metrics = (await c.get("/metrics")).text
        assert 'qumos_orch_integrity_failures_total{provider="provider-b"} 1.0' in metrics
        # 30% of rows tampered: with 4 canaries a call is caught with p = 1 - 0.7^4 = 0.76
        lie["t"].fraction = 0.3
        codes = [
            (await c.post(PRED, json={"instances": raw.tolist()})).status_code for _ in range(20)
        ]
        assert set(codes) <= {200, 502}
        assert codes.count(502) >= 9, codes  # expected ~15; P(< 9) < 1e-3
        # the canaries survive a restart of the orchestrator (same data dir)
    from services.orchestrator.app import create_app as orch_app
    from services.orchestrator.settings import OrchestratorSettings

    s = OrchestratorSettings(
        data_dir=tmp_path / "orchestrator",
        tokens_dir=tmp_path / "tokens",
        admin_token_file=tmp_path / "admin_token",
        providers="provider-a=http://a,provider-b=http://b,provider-c=http://c",
    )
    app = orch_app(s)
    async with running(app) as c:
        assert (await c.get("/v1/models/digits4")).json()["canaries"] == 16
        assert app.state.orchestrator.problems == []
        key = tmp_path / "orchestrator" / "canary.key"
        assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32


async def test_canaries_in_shots_mode_no_false_alarm(tmp_path, artifact, data):
    async with company_stack(tmp_path, artifact) as (c, admin, prov):
        await deploy_inprocess(c, admin, prov, artifact)
        await register_canaries(c, admin, artifact, data)
        body = {"instances": data.test.raw[:8].tolist(), "shots": 1024, "seed": 3}
        first = await c.post(PRED, json=body)
        assert first.status_code == 200, first.text
        for seed in range(4, 10):  # 6 more calls x 3 fragments x 4 canaries x 4 qubits
            r = await c.post(PRED, json=body | {"seed": seed})
            assert r.status_code == 200, r.text
        # seeded: the same canaries at the same places, so the same sampled answer
        again = await c.post(PRED, json=body)
        assert again.json()["probabilities"] == first.json()["probabilities"]


async def test_canary_registration_rules(tmp_path, artifact, data):
    async with company_stack(tmp_path, artifact) as (c, admin, prov):
        h = {"Authorization": f"Bearer {admin}"}
        req = make_canaries(artifact.spec, data.train.raw[:4])
        url = "/v1/models/digits4/canaries"
        assert (await c.put(url, content=req.model_dump_json(), headers=h)).status_code == 404
        await deploy_inprocess(c, admin, prov, artifact)
        assert (
            await c.put(url, content=req.model_dump_json(), headers={"Authorization": ""})
        ).status_code == 401
        provider_token = prov["provider-a"][1]
        r = await c.put(
            url,
            content=req.model_dump_json(),
            headers={"Authorization": f"Bearer {provider_token}"},
        )
        assert r.status_code == 403
        bad = req.model_copy(update={"fragments": req.fragments[:2]})
        r = await c.put(url, content=bad.model_dump_json(), headers=h)
        assert r.status_code == 422 and r.json()["error"]["field"] == "fragments"
        f1 = req.fragments[1].model_copy(
            update={"inputs": [row[:3] for row in req.fragments[1].inputs]}
        )
        bad = req.model_copy(update={"fragments": [req.fragments[0], f1, req.fragments[2]]})
        r = await c.put(url, content=bad.model_dump_json(), headers=h)
        assert r.status_code == 422 and r.json()["error"]["field"] == "fragments[1].inputs[0]"
        r = await c.put(
            url, content=b'{"fragments": [{"inputs": [[NaN]], "outputs": [[0]]}]}', headers=h
        )
        assert r.status_code == 422 and "finite" in r.json()["error"]["message"]
        assert (await c.put(url, content=req.model_dump_json(), headers=h)).status_code == 200
        # re-registering the model (new weights) drops its canaries
        await deploy_inprocess(c, admin, prov, artifact)
        assert (await c.get("/v1/models/digits4")).json()["canaries"] == 0


class Stall(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request):
        await asyncio.sleep(3600)


async def test_stalled_provider_gives_504(tmp_path, artifact, data):
    async with company_stack(
        tmp_path, artifact, {"provider-c": Stall()}, timeout_s=0.5, retries=1
    ) as (c, admin, prov):
        await deploy_inprocess(c, admin, prov, artifact)
        t0 = asyncio.get_running_loop().time()
        r = await c.post(PRED, json={"instances": data.test.raw[:2].tolist()})
        took = asyncio.get_running_loop().time() - t0
        assert r.status_code == 504, r.text
        msg = r.json()["error"]["message"]
        assert "provider-c" in msg and "digits4.2" in msg and "2 attempts" in msg
        assert took < 5, took


async def test_provider_retry_after_is_honoured_then_503(tmp_path, artifact, data):
    state = {"busy": 2, "calls": 0}

    def busy(app):
        inner = httpx.ASGITransport(app=app)

        class Busy(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request):
                state["calls"] += 1
                if state["busy"] > 0:
                    state["busy"] -= 1
                    return httpx.Response(
                        503,
                        headers={"Retry-After": "0"},
                        json={"error": {"type": "overloaded", "message": "at the limit"}},
                    )
                return await inner.handle_async_request(request)

        return Busy()

    async with company_stack(tmp_path, artifact, {"provider-a": busy}, retries=2) as (
        c,
        admin,
        prov,
    ):
        await deploy_inprocess(c, admin, prov, artifact)
        r = await c.post(PRED, json={"instances": data.test.raw[:3].tolist()})
        assert r.status_code == 200, r.text  # two 503s, then served
        np.testing.assert_allclose(
            r.json()["probabilities"], torch_probs(artifact.spec, data.test.x[:3]), atol=1e-4
        )
        assert state["calls"] == 3
        state["busy"] = 100
        r = await c.post(PRED, json={"instances": data.test.raw[:3].tolist()})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["type"] == "provider_overloaded" and "provider-a" in err["message"]
        assert state["calls"] == 6  # bounded: 1 + 2 retries


async def test_overload_pushes_back(tmp_path, artifact, data):
    """limit 2, 20 concurrent requests: the excess gets 503 + Retry-After at once; every
    200 is right; nothing else. (Worker-thread batches: INLINE_ROWS=0. Small exact batches
    run on the event loop one at a time, so they never pile up in flight.)"""
    s, token = provider_settings(tmp_path, "provider-a", max_inflight=2, inline_rows=0)
    async with running(__import__("services.provider.app", fromlist=["x"]).create_app(s)) as c:
        ff = artifact.fragment_file(0)
        h = {"Authorization": f"Bearer {token}"}
        assert (
            await c.put(f"/v1/fragments/{ff.fragment_id}", content=ff.model_dump_json(), headers=h)
        ).status_code == 201
        x = np.random.default_rng(0).uniform(0, np.pi, (20, 16))
        want = statevector_expectations(artifact.spec.fragments[0], x)

        async def one(i):
            return await c.post(
                "/v1/fragments/digits4.0/execute", json={"inputs": x[i : i + 1].tolist()}, headers=h
            )

        rs = await asyncio.gather(*(one(i) for i in range(20)))
        codes = [r.status_code for r in rs]
        assert set(codes) == {200, 503}, codes
        assert codes.count(200) >= 2
        for i, r in enumerate(rs):
            if r.status_code == 200:
                np.testing.assert_allclose(r.json()["outputs"], want[i : i + 1], atol=1e-6)
            else:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "overloaded"
        assert (await c.get("/readyz")).status_code == 200  # health is never limited
        assert "qumos_overload_rejections_total" in (await c.get("/metrics")).text
    async with company_stack(
        tmp_path / "o", artifact, max_inflight=2, provider_kw={"inline_rows": 0}
    ) as (c, admin, prov):
        await deploy_inprocess(c, admin, prov, artifact)
        want = torch_probs(artifact.spec, data.test.x[:20])
        rs = await asyncio.gather(
            *(
                c.post(PRED, json={"instances": data.test.raw[i : i + 1].tolist()})
                for i in range(20)
            )
        )
        codes = [r.status_code for r in rs]
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        for i, r in enumerate(rs):
            if r.status_code == 200:
                np.testing.assert_allclose(r.json()["probabilities"], want[i : i + 1], atol=1e-4)
            else:
                assert r.headers["retry-after"] == "1"


async def test_storage_faults_provider(tmp_path, artifact, monkeypatch):
    """Disk full on deploy: 507 naming data_dir, the loaded fragment keeps serving. Access
    log unwritable: the answer is served and the failure counted (default policy), or
    refused with 507 when ACCESS_LOG_REQUIRED."""
    import qumos.store

    from services.provider.app import create_app

    s, token = provider_settings(tmp_path, "provider-a")
    h = {"Authorization": f"Bearer {token}"}
    x = np.full((2, 16), 0.3)
    want = statevector_expectations(artifact.spec.fragments[0], x)
    async with running(create_app(s)) as c:
        ff = artifact.fragment_file(0)
        assert (
            await c.put("/v1/fragments/digits4.0", content=ff.model_dump_json(), headers=h)
        ).status_code == 201

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(qumos.store, "atomic_write", full)
        monkeypatch.setattr(qumos.store.ProviderStore, "append_log", full)
        r = await c.put("/v1/fragments/digits4.0", content=ff.model_dump_json(), headers=h)
        assert r.status_code == 507, r.text
        err = r.json()["error"]
        assert err["field"] == "data_dir" and "No space left" in err["message"]
        r = await c.post("/v1/fragments/digits4.0/execute", json={"inputs": x.tolist()}, headers=h)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["outputs"], want, atol=1e-6)
        ready = (await c.get("/readyz")).json()
        assert ready["fragments"] == 1 and "access log: 1 lines" in ready["degraded"][0]
        assert "qumos_provider_access_log_failures_total 1.0" in (await c.get("/metrics")).text
    s2 = s.model_copy(update={"access_log_required": True})
    async with running(create_app(s2)) as c:
        r = await c.post("/v1/fragments/digits4.0/execute", json={"inputs": x.tolist()}, headers=h)
        assert r.status_code == 507 and "access log" in r.json()["error"]["message"]


async def test_storage_faults_orchestrator(tmp_path, artifact, data, monkeypatch):
    import services.orchestrator.registry as orch

    async with company_stack(tmp_path, artifact) as (c, admin, prov):
        await deploy_inprocess(c, admin, prov, artifact)

        def read_only(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(orch, "atomic_write", read_only)
        r = await c.put(
            "/v1/models/digits4",
            content=artifact.company_spec().model_dump_json(),
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert r.status_code == 507, r.text
        assert "not writable" in r.json()["error"]["message"]
        r = await c.post(PRED, json={"instances": data.test.raw[:4].tolist()})
        assert r.status_code == 200
        np.testing.assert_allclose(
            r.json()["probabilities"], torch_probs(artifact.spec, data.test.x[:4]), atol=1e-4
        )
