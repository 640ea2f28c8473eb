"""The attacker as a live uvicorn process next to live providers and the orchestrator:
it reads only provider-b's directory, queries the public API, and its job's results
equal the library's."""

from __future__ import annotations

import time

import httpx
import pytest
from qumos.attack import AttackBudget, attack_provider, breach, victim_predictor
from qumos.datasets import load_task
from qumos.localstack import stack_on_free_ports
from qumos.spec import design_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def attack_stack(tmp_path_factory, live_artifact):
    s = stack_on_free_ports(tmp_path_factory.mktemp("attack-stack"), with_attacker=True)
    with s:
        s.deploy(live_artifact)
        yield s


def test_live_attack_job_with_public_queries(attack_stack, live_artifact):
    url = attack_stack.services["attacker"].url
    body = {"provider": "provider-b", "strategies": ["scratch", "substitute", "query"],
            "budget": {"epochs": 2, "restarts": 1, "queries": 60}, "seeds": [0],
            "design": design_of(live_artifact.spec).model_dump()}
    with httpx.Client(timeout=30, headers={
            "Authorization": f"Bearer {attack_stack.attacker_token}"}) as c:
        assert c.get(f"{url}/readyz").json()["breached_provider"] == "provider-b"
        bad = c.post(f"{url}/v1/attacks", json={**body, "provider": "provider-a"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "provider"
        r = c.post(f"{url}/v1/attacks", json=body)
        assert r.status_code == 202, r.text
        t0 = time.time()
        while time.time() - t0 < 300:
            job = c.get(f"{url}/v1/attacks/{r.json()['id']}").json()
            if job["status"] not in ("queued", "running"):
                break
            time.sleep(0.5)
    assert job["status"] == "succeeded", job["error"]
    res = job["results"]
    data = load_task("digits", 4, seed=0)
    lib = attack_provider(breach(attack_stack.data_dir("provider-b")), live_artifact.spec, data,
                          AttackBudget(epochs=2, restarts=1, queries=60), [0],
                          strategies=["scratch", "substitute", "query"],
                          victim_predict=victim_predictor(live_artifact.spec))
    # the victim's accuracy measured through the live chain (Aer) equals the in-process one
    assert res["victim_acc"] == pytest.approx(lib["victim_acc"], abs=0.01)
    for name in ("scratch", "substitute"):
        assert res["by_strategy"][name]["acc_mean"] == pytest.approx(
            lib["by_strategy"][name]["acc_mean"])
    assert res["by_strategy"]["query"]["fidelity_mean"] is not None
    assert res["leak"] == pytest.approx(lib["leak"], abs=0.05)
