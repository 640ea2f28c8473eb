"""The attacker service in process (lifespan included): a job runs to completion, its
results equal the library driver's, bad requests get 422 naming the field, jobs persist.
(A `breach+queries` job needs a live orchestrator: tests/integration/test_attack_live.py.)"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from qumos.artifact import load_artifact
from qumos.attack import AttackConfig, Victim, breach, run_attack
from qumos.attack.context import strip
from qumos.datasets import load_task
from qumos.spec import build_spec, design_of
from qumos.store import ProviderStore

from services.attacker.app import create_app
from services.attacker.settings import AttackerSettings


@pytest.fixture()
def breached(tmp_path, small_artifact):
    art = load_artifact(small_artifact)
    store = ProviderStore.create(tmp_path / "provider-b", "provider-b")
    store.put(art.fragment_file(1))
    return art, store.root


ADMIN = "attacker-admin-token-for-tests"


def _settings(tmp_path, breached_dir, **kw):
    (tmp_path / "attacker_token").write_text(ADMIN)
    return AttackerSettings(
        breached_dir=breached_dir,
        data_dir=tmp_path / "attacker",
        admin_token_file=tmp_path / "attacker_token",
        **kw,
    )


def _client(app) -> TestClient:
    return TestClient(app, headers={"Authorization": f"Bearer {ADMIN}"})


def _wait(client, job_id, timeout=300):
    seen = []
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = client.get(f"/v1/attacks/{job_id}").json()
        seen.append(job["progress"])
        if job["status"] not in ("queued", "running"):
            return job, seen
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def test_job_runs_and_matches_the_library(tmp_path, breached):
    art, root = breached
    before = sorted(p.name for p in root.rglob("*"))
    strategies = ["scratch", "logreg", "substitute", "head_only"]
    body = {
        "provider": "provider-b",
        "profile": "breach",
        "strategies": strategies,
        "budget": {"fraction": 0.05, "epochs": 3, "restarts": 1},
        "seeds": [0, 1],
        "design": design_of(art.spec).model_dump(),
        "victim_acc": 0.8,
    }
    with _client(create_app(_settings(tmp_path, root))) as client:
        assert client.get("/readyz").json()["breached_provider"] == "provider-b"
        r = client.post("/v1/attacks", json=body)
        assert r.status_code == 202, r.text
        job, seen = _wait(client, r.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        listed = client.get("/v1/attacks").json()["attacks"]
        assert [j["id"] for j in listed] == [job["id"]]
        metrics = client.get("/metrics").text
        assert "http_requests_total" in metrics or "http_request" in metrics
    dones = [p.get("done") for p in seen if p.get("done") is not None]
    assert dones == sorted(dones) and job["progress"]["done"] == 2  # seeds done
    # progress is merged, so even a poller that saw only the end sees the last epoch
    assert any(p.get("epoch") for p in seen) and job["progress"]["epoch"]
    res = job["results"]
    data = load_task("digits", 4, seed=0)
    victim = Victim(
        model=art.spec.name,
        providers=["fragment-0", "provider-b", "fragment-2"],
        acc=0.8,
        test_labels=-np.ones(len(data.test.y), int),
        arch=strip(build_spec(design_of(art.spec))),
    )
    lib = run_attack(
        AttackConfig(epochs=3, restarts=1, strategies=tuple(strategies)),
        data,
        victim,
        [breach(root)],
        [0, 1],
    ).to_dict()
    assert res["S"] == pytest.approx(lib["S"]) and res["S_reference"] == lib["S_reference"]
    (p,) = res["providers"]
    (q,) = lib["providers"]
    for name in ("substitute", "head_only"):
        assert p["by_strategy"][name]["acc"] == pytest.approx(q["by_strategy"][name]["acc"])
    assert p["A"] == pytest.approx(q["A"]) and p["leak"] == pytest.approx(q["leak"])
    assert res["index"] == 1 and res["provider"] == "provider-b" and "table" in res
    # the breached directory was only read
    assert sorted(p.name for p in root.rglob("*")) == before
    # results persist: a new app over the same data dir serves the finished job
    with _client(create_app(_settings(tmp_path, root))) as client:
        again = client.get(f"/v1/attacks/{job['id']}").json()
        assert again["status"] == "succeeded" and again["results"]["S"] == res["S"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"provider": "provider-x"}, "provider"),
        ({"budget": {"fraction": 0}}, "budget.fraction"),
        ({"budget": {"fraction": 1.5}}, "budget.fraction"),
        ({"budget": {"epochs": 100000}}, "budget.epochs"),
        ({"strategies": ["scratch", "steal"]}, "strategies"),
        ({"strategies": ["insider"]}, "strategies"),  # not a strategy of profile breach
        ({"profile": "steal"}, "profile"),
        ({"profile": "coalition", "coalition": ["provider-b", "provider-a"]}, "profile"),
        ({"profile": "breach+queries"}, "profile"),  # no orchestrator configured
        ({"victim_acc": None}, "victim_acc"),  # unknown, and no orchestrator to measure it
        ({"seeds": []}, "seeds"),
        ({"seeds": list(range(50))}, "seeds"),
        ({"design": None}, "design"),
        ({"model": "other-model"}, "model"),
    ],
)
def test_bad_requests_name_the_field(tmp_path, breached, change, field):
    art, root = breached
    body = {
        "design": design_of(art.spec).model_dump(),
        "seeds": [0],
        "victim_acc": 0.8,
        "budget": {"epochs": 1, "restarts": 1},
        **change,
    }
    with _client(create_app(_settings(tmp_path, root))) as client:
        r = client.post("/v1/attacks", json=body)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["field"].startswith(field), err
        assert field.split(".")[-1] in err["message"]
        assert client.get("/v1/attacks").json()["attacks"] == []
        assert client.get("/v1/attacks/nope").status_code == 404


def test_not_a_provider_directory_is_refused(tmp_path, small_artifact):
    with _client(create_app(_settings(tmp_path, small_artifact))) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert "not a provider's data directory" in r.json()["error"]["message"]
        r = client.post(
            "/v1/attacks", json={"know_architecture": False, "seeds": [0], "victim_acc": 0.8}
        )
        assert r.status_code == 409
        assert r.json()["error"]["field"] == "breached_dir"


def test_interrupted_job_is_marked_not_lost(tmp_path, breached):
    _, root = breached
    jobs = tmp_path / "attacker" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "abc123.json").write_text(
        json.dumps(
            {
                "id": "abc123",
                "status": "running",
                "provider": "provider-b",
                "request": {},
                "progress": {"done": 1, "total": 4},
                "created": 1.0,
                "started": 2.0,
            }
        )
    )
    with _client(create_app(_settings(tmp_path, root))) as client:
        job = client.get("/v1/attacks/abc123").json()
        assert job["status"] == "interrupted" and "resubmit" in job["error"]
        assert job["progress"] == {"done": 1, "total": 4}


def test_submit_needs_the_admin_token_bounded_seeds_and_queue(tmp_path, breached):
    from services.attacker.models import Job

    art, root = breached
    body = {
        "design": design_of(art.spec).model_dump(),
        "seeds": [0],
        "budget": {"epochs": 1, "restarts": 1},
    }
    app = create_app(_settings(tmp_path, root, max_pending=1))
    with _client(app) as client:
        r = client.post("/v1/attacks", json=body, headers={"Authorization": ""})
        assert r.status_code == 401 and r.json()["error"]["field"] == "authorization"
        r = client.post("/v1/attacks", json=body, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 403
        r = client.post("/v1/attacks", json={**body, "seeds": [2**70]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "seeds[0]", r.text
        # one job queued or running fills a queue of 1: the next gets 503 + Retry-After
        app.state.attacker.jobs["busy"] = Job(
            id="busy", status="running", provider="provider-b", request={}, created=1.0
        )
        r = client.post("/v1/attacks", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "30", r.text
        assert "QUMOS_ATTACKER_MAX_PENDING" in r.json()["error"]["message"]
        assert [j["id"] for j in client.get("/v1/attacks").json()["attacks"]] == ["busy"]
        # the schema documents the body and the errors (a fuzzer can reach the endpoint)
        op = client.get("/openapi.json").json()["paths"]["/v1/attacks"]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/AttackRequest"
        )
        assert {"401", "403", "409", "422", "503"} <= set(op["responses"])
        r = client.request("OPTIONS", "/v1/attacks")
        assert r.status_code == 405 and r.headers["allow"] == "GET, POST"


def test_coalition_job_over_mounted_providers(tmp_path, breached):
    """A deployment that mounts more breached providers (COALITION_DIRS) runs coalition
    jobs; without them, or naming a provider not mounted, it is a 422."""
    art, root = breached
    store = ProviderStore.create(tmp_path / "provider-a", "provider-a")
    store.put(art.fragment_file(0))
    body = {
        "profile": "coalition",
        "coalition": ["provider-a", "provider-b"],
        "strategies": ["logreg", "substitute"],
        "seeds": [0],
        "victim_acc": 0.8,
        "budget": {"epochs": 2, "restarts": 1},
        "design": design_of(art.spec).model_dump(),
    }
    with _client(create_app(_settings(tmp_path, root))) as client:  # one mounted
        r = client.post("/v1/attacks", json=body)
        assert r.status_code == 422 and r.json()["error"]["field"] == "profile", r.text
    s = _settings(tmp_path, root, coalition_dirs=[store.root])
    with _client(create_app(s)) as client:
        r = client.post("/v1/attacks", json={**body, "coalition": ["provider-a", "provider-c"]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "coalition", r.text
        assert "not mounted" in r.json()["error"]["message"]
        r = client.post("/v1/attacks", json=body)
        assert r.status_code == 202, r.text
        job, _ = _wait(client, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    (p,) = job["results"]["providers"]
    assert p["provider"] == "provider-a+provider-b" and sorted(p["index"]) == [0, 1]
