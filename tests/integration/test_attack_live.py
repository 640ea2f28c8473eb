"""The attacker against live services (uvicorn processes on loopback): the insider's
queries go through the real public API and its rows come from the real access.jsonl;
the attacker service runs a `breach+queries` job."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from qumos.attack import AttackConfig, Victim, attacker_data, breach, run_attack
from qumos.attack.holdings import fragment_rows
from qumos.attack.live import HttpOracle
from qumos.datasets import load_task
from qumos.localstack import stack_on_free_ports
from qumos.spec import design_of

from tests.support.reports import assert_report_consistent

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def attack_stack(tmp_path_factory, live_artifact):
    # the attacker against an orchestrator without the row defences (tests/integration/
    # test_defenses_live.py has them on): identical rows are not merged
    s = stack_on_free_ports(
        tmp_path_factory.mktemp("attack-stack"),
        with_attacker=True,
        orchestrator_env={"QUMOS_ORCH_DEDUP_ROWS": "0"},
    )
    with s:
        s.deploy(live_artifact)
        yield s


def test_insider_attributes_its_rows_in_the_real_logs(attack_stack, live_artifact):
    """Queries over HTTP; each provider's real log, canaries mixed in, gives back exactly
    the rows that provider executed for them (checked against the in-process chain)."""
    spec = live_artifact.spec
    data = load_task("digits", 4, seed=0)
    own = attacker_data(data, 0.05, 0)
    q = own.queries(data, 40)
    dirs = {j: attack_stack.data_dir(p) for j, p in enumerate(spec.placement)}
    oracle = HttpOracle(
        attack_stack.orchestrator_url, spec.name, dirs, api_key=attack_stack.client_key
    )
    probs = oracle.answer(data.train.raw[q])
    want = fragment_rows(spec, data.train.x[q])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    for j in range(spec.n_fragments):
        rows = oracle.rows(j, data.train.raw[q], data.train.x[q])
        # each query is sent twice in its request: its rows are the call's only repeats
        assert rows.found.mean() >= 0.9, (j, rows.found.mean())
        f = rows.found
        right = np.all(np.abs(rows.inputs[f] - want[j][0][f]) < 1e-5, axis=1) & np.all(
            np.abs(rows.outputs[f] - want[j][1][f]) < 1e-5, axis=1
        )
        assert right.all(), (j, right.mean())
    assert oracle.images_sent == 2 * len(q)
    # without the repeat the insider relies on canaries recurring across calls; in a
    # young log (few calls) that attributes little, and what it attributes can be wrong
    # when a query happens to be one of the company's canary images
    once = HttpOracle(
        attack_stack.orchestrator_url, spec.name, dirs, repeat=1, api_key=attack_stack.client_key
    )
    once.answer(data.train.raw[q[:10]])
    assert once.rows(0, data.train.raw[q[:10]], data.train.x[q[:10]]).found.all()
    if (attack_stack.data_dir("provider-a") / "access.jsonl").is_file():
        assert oracle.rows(0, data.train.raw[q], data.train.x[q]).found.all()  # by content


def test_breach_plus_queries_against_the_live_stack(attack_stack, live_artifact):
    """The library driver with live queries and the real log equals, up to Aer's rounding,
    the in-process run (same seeds)."""
    spec = live_artifact.spec
    data = load_task("digits", 4, seed=0)
    cfg = AttackConfig(
        profile="breach+queries",
        queries=15,
        epochs=3,
        restarts=1,
        strategies=("scratch", "logreg", "insider"),
    )
    dirs = {j: attack_stack.data_dir(p) for j, p in enumerate(spec.placement)}
    victim = Victim.in_process(spec, data)
    inproc_oracle = victim.oracle
    victim.oracle = HttpOracle(
        attack_stack.orchestrator_url, spec.name, {2: dirs[2]}, api_key=attack_stack.client_key
    )
    live = run_attack(cfg, data, victim, [breach(dirs[2])], [0]).to_dict()
    victim.oracle = inproc_oracle
    from qumos.attack import in_process_holdings

    local = run_attack(cfg, data, victim, in_process_holdings(spec, data, cfg, 0)[2:], [0])
    local = local.to_dict()
    (p,) = live["providers"]
    assert p["provider"] == "provider-c"
    assert "of 15 query rows attributed" in p["by_strategy"]["insider"]["note"]
    assert live["S"] == pytest.approx(local["S"])
    assert p["A"][0] == pytest.approx(local["providers"][0]["A"][0], abs=0.03)


def test_attacker_service_runs_a_breach_plus_queries_job(attack_stack, live_artifact):
    url = attack_stack.services["attacker"].url
    body = {
        "provider": "provider-b",
        "profile": "breach+queries",
        "strategies": ["scratch", "knn", "distill_mlp", "head_only", "insider"],
        "budget": {"epochs": 3, "restarts": 1, "queries": 10},
        "seeds": [0],
        "design": design_of(live_artifact.spec).model_dump(),
    }
    with httpx.Client(
        timeout=30, headers={"Authorization": f"Bearer {attack_stack.attacker_token}"}
    ) as c:
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
    assert res["profile"] == "breach+queries" and res["queries"] == 10
    (p,) = res["providers"]
    assert p["provider"] == "provider-b"
    assert "query rows attributed" in p["by_strategy"]["insider"]["note"]
    # the victim's accuracy, measured through the live chain (Aer), equals the in-process
    data = load_task("digits", 4, seed=0)
    v = Victim.in_process(live_artifact.spec, data)
    assert res["victim_acc"][0] == pytest.approx(v.acc, abs=0.01)
    assert p["fidelity"][0] is not None
    assert_report_consistent(res)  # one seed: S, A, leak and security exactly
    assert set(res["references"]) == {"scratch", "knn", "distill_mlp"}
