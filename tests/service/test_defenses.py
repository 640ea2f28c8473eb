"""Defences of the public API (issue 16), in process: keys, quotas, output policy,
monitor, batching, input hiding; bad input and faults."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tests.support.services import company_stack, create_key, deploy_inprocess

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def data():
    from qumos.datasets import load_task

    return load_task("digits", 4, seed=0)


def _body(raw) -> dict:
    return {"instances": np.asarray(raw).tolist()}


async def test_keys_missing_unknown_revoked(tmp_path, artifact, data, caplog):
    caplog.set_level(logging.DEBUG)
    async with company_stack(tmp_path, artifact) as (c, admin, prov):
        await deploy_inprocess(c, admin, prov, artifact)
        url = "/v1/models/digits4/predict"
        key = c.headers["Authorization"].split()[1]
        r = await c.post(url, json=_body(data.test.raw[:2]), headers={"Authorization": ""})
        assert r.status_code == 401 and "missing" in r.json()["error"]["message"]
        r = await c.post(
            url, json=_body(data.test.raw[:2]), headers={"Authorization": f"Bearer {key[:-3]}abc"}
        )
        assert r.status_code == 401 and "unknown API key" in r.json()["error"]["message"]
        r = await c.post(
            url, json=_body(data.test.raw[:2]), headers={"Authorization": f"Bearer {admin}"}
        )
        assert r.status_code == 401 and "not an API key" in r.json()["error"]["message"]
        assert (await c.post(url, json=_body(data.test.raw[:2]))).status_code == 200
        kid = key[:15]
        lst = (await c.get("/v1/keys", headers={"Authorization": f"Bearer {admin}"})).json()
        assert [k["id"] for k in lst["keys"]] == [kid]
        assert key not in str(lst) and "hash" not in lst["keys"][0]
        r = await c.delete(f"/v1/keys/{kid}", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200 and r.json()["revoked"]
        r = await c.post(url, json=_body(data.test.raw[:2]))
        assert r.status_code == 403 and "revoked" in r.json()["error"]["message"]
        # the store holds salted hashes only
        store = (tmp_path / "orchestrator" / "keys.json").read_text()
        assert key[16:] not in store and kid.removeprefix("qk_") in store
        assert key[16:] not in caplog.text  # no key in any log
        r = await c.post(
            "/v1/keys", json={"name": "bad name"}, headers={"Authorization": f"Bearer {admin}"}
        )
        assert r.status_code == 422 and r.json()["error"]["field"] == "name"
        r = await c.delete("/v1/keys/qk_000000000000", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 404


async def test_quota_429_headers_and_restart(tmp_path, artifact, data):
    async with company_stack(tmp_path, artifact) as (c, admin, prov):
        await deploy_inprocess(c, admin, prov, artifact)
        key = await create_key(c, admin, "q", images_per_window=5, window_s=3600, images_total=8)
        h = {"Authorization": f"Bearer {key}"}
        url = "/v1/models/digits4/predict"
        r = await c.post(url, json=_body(data.test.raw[:3]), headers=h)
        assert r.status_code == 200
        assert r.headers["RateLimit-Limit"] == "5" and r.headers["RateLimit-Remaining"] == "2"
        r = await c.post(url, json=_body(data.test.raw[:3]), headers=h)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 3000
        assert r.headers["RateLimit-Remaining"] == "2"
        assert "quota" in r.json()["error"]["message"]
        metrics = (await c.get("/metrics")).text
        assert 'qumos_orch_key_images_total{key="' + key[:15] + '"} 3.0' in metrics
    # a restart keeps the counters
    async with company_stack(tmp_path, artifact) as (c, admin, prov):
        r = await c.post(url, json=_body(data.test.raw[:3]), headers=h)
        assert r.status_code == 429
        r = await c.post(url, json=_body(data.test.raw[:2]), headers=h)
        assert r.status_code == 200 and r.headers["RateLimit-Remaining"] == "0"


def test_quota_file_survives_a_crash_mid_write(tmp_path, monkeypatch):
    import os

    from qumos.defense.quota import Quota, QuotaBook

    book = QuotaBook(tmp_path / "quota.json")
    assert book.charge("k", Quota(images_total=10), 4).allowed
    book.flush()
    assert book.charge("k", Quota(images_total=10), 4).allowed

    def crash(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        book.flush()
    monkeypatch.undo()
    again = QuotaBook(tmp_path / "quota.json")
    again.load()
    assert again.usage["k"].total == 4  # the last complete write
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "policy,check",
    [
        ({"kind": "label"}, "label"),
        ({"kind": "top_k", "k": 1, "decimals": 2}, "top1"),
        ({"kind": "probabilities", "decimals": 3}, "round3"),
    ],
)
async def test_output_policy_v1_and_v2_identical(tmp_path, artifact, data, policy, check):
    from qumos.defense.policy import OutputPolicy, apply_policy

    from tests.support.services import torch_probs

    async with company_stack(tmp_path, artifact) as (c, admin, prov):
        await deploy_inprocess(c, admin, prov, artifact)
        ha = {"Authorization": f"Bearer {admin}"}
        r = await c.put("/v1/models/digits4/policy", json=policy, headers=ha)
        assert r.status_code == 200 and r.json()["output_policy"]["kind"] == policy["kind"]
        raw = data.test.raw[:6]
        v1 = (await c.post("/v1/models/digits4/predict", json=_body(raw))).json()
        want = apply_policy(torch_probs(artifact.spec, data.test.x[:6]), OutputPolicy(**policy))
        v2 = (
            await c.post(
                "/v2/models/digits4/infer",
                json={
                    "inputs": [
                        {
                            "name": "images",
                            "shape": [6, 64],
                            "datatype": "FP64",
                            "data": raw.ravel().tolist(),
                        }
                    ]
                },
            )
        ).json()
        outs = {o["name"]: o for o in v2["outputs"]}
        if check == "label":
            assert v1.get("probabilities") is None and "probabilities" not in outs
            assert v1["predictions"] == want.tolist()
            r = await c.post(
                "/v2/models/digits4/infer",
                json={
                    "inputs": [
                        {
                            "name": "images",
                            "shape": [1, 64],
                            "datatype": "FP64",
                            "data": raw[0].tolist(),
                        }
                    ],
                    "outputs": [{"name": "probabilities"}],
                },
            )
            assert r.status_code == 422 and "output policy" in r.json()["error"]
        else:
            p1 = np.asarray(v1["probabilities"])
            p2 = np.asarray(outs["probabilities"]["data"]).reshape(6, -1)
            np.testing.assert_array_equal(p1, p2)
            np.testing.assert_allclose(p1, want, atol=1e-9)
            if check == "top1":
                assert ((p1 > 0).sum(axis=1) == 1).all()
        # the policy persists across a restart with the model
    async with company_stack(tmp_path, artifact) as (c, admin, prov):
        info = (await c.get("/v1/models/digits4")).json()
        assert info["output_policy"]["kind"] == policy["kind"]


async def test_invalid_policy_is_422(tmp_path, artifact):
    async with company_stack(tmp_path, artifact) as (c, admin, prov):
        await deploy_inprocess(c, admin, prov, artifact)
        ha = {"Authorization": f"Bearer {admin}"}
        for bad in (
            {"kind": "top_k"},
            {"kind": "top_k", "k": 9},
            {"kind": "label", "decimals": 2},
            {"kind": "nope"},
            {"kind": "probabilities", "decimals": 99},
        ):
            r = await c.put("/v1/models/digits4/policy", json=bad, headers=ha)
            assert r.status_code == 422, (bad, r.text)
        spec = artifact.company_spec().model_dump(mode="json")
        spec["output_policy"] = {"kind": "top_k", "k": 0}
        r = await c.put("/v1/models/digits4", json=spec, headers=ha)
        assert r.status_code == 422 and "output_policy" in r.json()["error"]["message"]


def test_bad_monitor_setting_names_the_variable(tmp_path, monkeypatch):
    from qumos.config import load_settings
    from qumos.errors import SettingsError

    from services.orchestrator.settings import OrchestratorSettings

    for var, value in (
        ("QUMOS_ORCH_MONITOR", "shout"),
        ("QUMOS_ORCH_MONITOR_DELTA", "1.5"),
        ("QUMOS_ORCH_BATCH_WINDOW_MS", "-1"),
    ):
        monkeypatch.setenv("QUMOS_ORCH_DATA_DIR", str(tmp_path))
        monkeypatch.setenv("QUMOS_ORCH_PROVIDERS", "a=http://a")
        monkeypatch.setenv("QUMOS_ORCH_TOKENS_DIR", str(tmp_path))
        monkeypatch.setenv("QUMOS_ORCH_ADMIN_TOKEN_FILE", str(tmp_path / "t"))
        monkeypatch.setenv(var, value)
        with pytest.raises(SettingsError, match=var):
            load_settings(OrchestratorSettings)
        monkeypatch.delenv(var)


async def test_monitor_flags_and_blocks_a_synthetic_attacker(tmp_path, artifact, data):
    async with company_stack(tmp_path, artifact, monitor="block") as (c, admin, prov):
        await deploy_inprocess(c, admin, prov, artifact)
        benign = await create_key(c, admin, "benign")
        thief = await create_key(c, admin, "thief")
        url = "/v1/models/digits4/predict"
        # JBDA-style synthetic queries: 10 seeds, each step +-1 pixel on every pixel
        rng = np.random.default_rng(1)
        x = list(data.train.raw[:10])
        while len(x) < 400:
            x += [np.clip(v + rng.choice([-1, 1], 64), 0, 16) for v in x]
        status = []
        for i in range(0, 400, 8):
            r = await c.post(
                url,
                json=_body(np.asarray(x[i : i + 8])),
                headers={"Authorization": f"Bearer {thief}"},
            )
            status.append(r.status_code)
            if r.status_code == 403:
                break
        assert status[-1] == 403 and len(status) * 8 < 400, status
        for i in range(0, len(data.test.raw), 8):  # benign traffic is not flagged
            r = await c.post(
                url,
                json=_body(data.test.raw[i : i + 8]),
                headers={"Authorization": f"Bearer {benign}"},
            )
            assert r.status_code == 200, r.text
        fl = (await c.get("/v1/keys/flagged", headers={"Authorization": f"Bearer {admin}"})).json()
        assert [k["name"] for k in fl["flagged"]] == ["thief"]
        assert "Shapiro-Wilk" in fl["flagged"][0]["flagged"]["reason"]


async def test_batching_shuffles_concurrent_requests_into_one_call(tmp_path, artifact, data):
    import anyio

    from tests.support.services import torch_probs

    async with company_stack(tmp_path, artifact, batch_window_ms=50, canaries_per_call=0) as (
        c,
        admin,
        prov,
    ):
        await deploy_inprocess(c, admin, prov, artifact)
        state = c._transport.app.state.orchestrator
        out = {}

        async def one(i):
            r = await c.post("/v1/models/digits4/predict", json=_body(data.test.raw[i : i + 1]))
            out[i] = r.json()["probabilities"][0]

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        assert state.batcher.batches < 8  # requests shared provider calls
        want = torch_probs(artifact.spec, data.test.x[:8])
        np.testing.assert_allclose([out[i] for i in range(8)], want, atol=1e-9)


async def test_throttle_delays_a_flagged_key_and_anonymous_is_opt_in(tmp_path, artifact, data):
    import time

    async with company_stack(
        tmp_path, artifact, monitor="throttle", monitor_throttle_s=0.4, allow_anonymous=True
    ) as (c, admin, prov):
        await deploy_inprocess(c, admin, prov, artifact)
        url = "/v1/models/digits4/predict"
        r = await c.post(url, json=_body(data.test.raw[:1]), headers={"Authorization": ""})
        assert r.status_code == 200  # anonymous allowed here (off by default: see above)
        thief = await create_key(c, admin, "thief")
        rng = np.random.default_rng(1)
        x = list(data.train.raw[:10])
        while len(x) < 200:
            x += [np.clip(v + rng.choice([-1, 1], 64), 0, 16) for v in x]
        for i in range(0, 200, 8):
            r = await c.post(
                url,
                json=_body(np.asarray(x[i : i + 8])),
                headers={"Authorization": f"Bearer {thief}"},
            )
            assert r.status_code == 200  # throttled, never refused
        fl = (await c.get("/v1/keys/flagged", headers={"Authorization": f"Bearer {admin}"})).json()
        assert fl["action"] == "throttle" and [k["name"] for k in fl["flagged"]] == ["thief"]
        t0 = time.perf_counter()
        r = await c.post(
            url, json=_body(data.test.raw[:1]), headers={"Authorization": f"Bearer {thief}"}
        )
        assert r.status_code == 200 and time.perf_counter() - t0 >= 0.4
