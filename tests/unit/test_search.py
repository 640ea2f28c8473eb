"""The security engine: design space, environment, evaluator, cache, PPO, executors, CLI.

Budgets are tiny (victim 1 epoch, attacker 1 epoch and 1 restart, one seed, depths 1-2)
but every evaluation is real: real training, real attacks.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from qumos.errors import DesignError, QumosError
from qumos.search.env import DesignEnv, DesignSpace
from qumos.search.evaluator import EvalCache, EvalConfig, Evaluator, evaluate_design, reward
from qumos.search.experiment import even_split, markdown_table, target_checks
from qumos.search.search import Budget, pareto_front, ppo_search, random_search
from qumos.spec import Design, design_from_flags

CHEAP = EvalConfig(seeds=(0,), victim_epochs=1, attack_epochs=1, attack_restarts=1)
SMALL = {"depths": (1,)}


def _const_reward(design: Design):
    return float(sum(f.depth for f in design.fragments)), {}


@pytest.mark.parametrize("space", [DesignSpace(n_fragments=3), DesignSpace(n_fragments=None),
                                   DesignSpace.centralized(),
                                   DesignSpace("mnist-small", 2, n_fragments=2)])
def test_env_passes_check_env_without_warnings(space):
    from stable_baselines3.common.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(DesignEnv(space, _const_reward), warn=True)


def test_space_roundtrip_and_ranges():
    rng = np.random.default_rng(0)
    for space in (DesignSpace(n_fragments=3), DesignSpace(n_fragments=None)):
        ks = set()
        for _ in range(200):
            d = space.sample(rng)
            ks.add(len(d.fragments))
            assert all(1 <= f.depth <= 6 for f in d.fragments)
            assert not d.fragments[0].reupload
            assert space.decode(space.encode(d)).canonical() == d.canonical()
        assert ks == ({3} if space.n_fragments else {2, 3, 4})
    assert DesignSpace(n_fragments=3).nvec.tolist() == [5, 6, 3, 2] * 3 + [2, 2]
    assert DesignSpace.centralized().nvec.tolist() == [5, 6, 3, 2, 1, 1]
    with pytest.raises(DesignError, match="action"):
        DesignSpace(n_fragments=2).decode([9] * 10)
    with pytest.raises(DesignError, match="fragments"):
        DesignSpace(n_fragments=7)
    with pytest.raises(DesignError, match="depths"):
        DesignSpace(depths=(0, 7))


def test_env_step_is_one_step_episode():
    env = DesignEnv(DesignSpace(n_fragments=2), _const_reward)
    obs, _ = env.reset(seed=0)
    action = env.design_space.encode(design_from_flags(fragments="3-5"))
    obs2, r, terminated, truncated, info = env.step(action)
    assert (r, terminated, truncated) == (8.0, True, False)
    assert np.array_equal(obs, obs2) and info["design"] == "rxyz_cnot:3-rxyz_cnot:5|tanh|readout"


def test_even_split_depths():
    def cen(depth):
        return design_from_flags(fragments=str(depth), block="ry_cz", head="linear")

    assert [f.depth for f in even_split(cen(6), 3).fragments] == [2, 2, 2]
    assert [f.depth for f in even_split(cen(5), 3).fragments] == [2, 2, 1]
    assert [f.depth for f in even_split(cen(2), 3).fragments] == [1, 1, 1]
    s = even_split(cen(4), 2)
    assert {f.block for f in s.fragments} == {"ry_cz"} and s.head == "linear"
    with pytest.raises(QumosError, match="one-fragment"):
        even_split(s, 2)


def test_pareto_front_and_budget_validation():
    pts = [(0.9, 0.5), (0.8, 0.1), (0.7, 0.2), (0.9, 0.6), (0.95, 0.9)]
    assert pareto_front(pts) == [0, 1, 4]
    with pytest.raises(QumosError, match="budget"):
        Budget()
    with pytest.raises(QumosError, match="--max-evals"):
        Budget(max_evals=0)


def test_evaluator_reward_and_cache_resume(tmp_path):
    design = design_from_flags(fragments="1-1", block="ry_cz")
    cache_file = tmp_path / "cache.jsonl"
    ev = Evaluator(CHEAP, lam=1.0, cache=EvalCache(cache_file))
    rec = ev.evaluate_many([design])[0]
    assert ev.fresh == 1
    assert len(rec["attacker_acc"]) == 2 and 0 <= rec["victim_acc"][0] <= 1
    gain = max(a[0] for a in rec["attacker_acc"]) - rec["S"][0]  # S: the best reference
    assert rec["worst_gain"][0] == pytest.approx(gain)
    assert rec["reward"] == pytest.approx(rec["victim_acc"][0] - gain)
    assert reward(rec, 2.5) == pytest.approx(rec["victim_acc"][0] - 2.5 * gain)
    assert reward(rec, 0.0) == rec["victim_acc"][0]
    assert rec["security"][0] == pytest.approx(1 - rec["worst_leak"][0])
    # A crashed search resumes from the JSONL cache without evaluating again.
    with cache_file.open("a") as f:
        f.write('{"truncated": ')
    ev2 = Evaluator(CHEAP, lam=0.5, cache=EvalCache(cache_file))
    rec2 = ev2.evaluate_many([design, design])[0]
    assert ev2.fresh == 0 and rec2["victim_acc"] == rec["victim_acc"]
    assert rec2["reward"] == pytest.approx(rec["victim_acc"][0] - 0.5 * gain)
    # A different evaluation budget is a different cache entry.
    assert EvalCache(cache_file).get(design, CHEAP.with_(victim_epochs=2)) is None


def test_evaluation_is_seeded_and_centralized_is_a_full_theft():
    design = design_from_flags(fragments="2", block="rxyz_cnot")
    a = evaluate_design((design.model_dump(), CHEAP))
    b = evaluate_design((design.model_dump(), CHEAP))
    assert a["victim_acc"] == b["victim_acc"] and a["attacker_acc"] == b["attacker_acc"]
    # One fragment with the fixed readout: the breached provider holds the whole model.
    assert a["worst_attacker_acc"][0] >= a["victim_acc"][0] - 1e-9
    assert a["security"][0] == 0.0
    no_attack = evaluate_design((design.model_dump(), CHEAP.with_(attacks=False)))
    assert no_attack["victim_acc"] == a["victim_acc"] and "worst_leak" not in no_attack
    with pytest.raises(ValueError, match="without attacks"):
        reward(no_attack, 1.0)


def test_ppo_search_updates_policy_and_respects_budget(tmp_path):
    space = DesignSpace(n_fragments=2, **SMALL)
    ev = Evaluator(CHEAP.with_(attacks=False), lam=0.0, cache=EvalCache(tmp_path / "c.jsonl"))
    res = ppo_search(space, ev, Budget(max_evals=4), seed=0, tb_dir=tmp_path / "tb", rollout=2)
    assert res.evaluations == 4 and len(res.records) == 4  # stops at the budget
    assert res.extra["updates"] >= 2  # PPO trained on its rollouts
    assert res.best["reward"] == max(r["reward"] for r in res.records)
    assert list((tmp_path / "tb").glob("ppo_*/events.out.tfevents.*"))
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 4


def test_random_search_is_seeded(tmp_path):
    space = DesignSpace(n_fragments=2, **SMALL)
    cfg = CHEAP.with_(attacks=False)
    runs = [random_search(space, Evaluator(cfg, lam=0.0), Budget(max_evals=2), seed=3)
            for _ in range(2)]
    assert [r["key"] for r in runs[0].records] == [r["key"] for r in runs[1].records]
    assert [r["victim_acc"] for r in runs[0].records] == [r["victim_acc"] for r in runs[1].records]


@pytest.mark.slow
def test_process_pool_matches_serial():
    from qumos.search.parallel import PoolExecutor, SerialExecutor, make_executor

    cfg = CHEAP.with_(attacks=False)
    jobs = [(design_from_flags(fragments=f, block="ry_cz").model_dump(), cfg)
            for f in ("1-1", "2-1")]
    pool = make_executor(2)
    assert isinstance(pool, PoolExecutor)
    try:
        par = pool.map(evaluate_design, jobs)
    finally:
        pool.close()
    ser = SerialExecutor().map(evaluate_design, jobs)
    assert [r["victim_acc"] for r in par] == [r["victim_acc"] for r in ser]
    assert len({r["pid"] for r in par}) >= 1 and all(r["pid"] != ser[0]["pid"] for r in par)
    with pytest.raises(QumosError, match="workers"):
        make_executor(0)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_local_cluster_matches_serial():
    from qumos.search.parallel import RayExecutor

    cfg = CHEAP.with_(attacks=False)
    job = (design_from_flags(fragments="1-1", block="ry_cz").model_dump(), cfg)
    ex = RayExecutor("local", workers=1)
    try:
        got = ex.map(evaluate_design, [job])
    finally:
        ex.close()
    assert got[0]["victim_acc"] == evaluate_design(job)["victim_acc"]


def test_report_table_and_target_checks():
    def row(method, acc, leak):
        rec = {"short": "x"}
        return {"method": method, "design": "x", "accuracy": [acc, 0.01],
                "worst_attacker_acc": [0.5, 0.0], "scratch_acc": [0.4, 0.0],
                "worst_leak": [leak, 0.0], "security": [1 - leak, 0.0], "reward": acc - leak,
                "evaluations": 3, "seconds": 12.0, "record": rec}

    rows = [row("centralized search (K=1, lambda=0)", 0.90, 1.0), row("even split into 3", 0.85, 0.5),
            row("engine (PPO)", 0.88, 0.2), row("random (best by reward)", 0.8, 0.3),
            row("random (median of 3)", 0.7, 0.4)]
    checks = target_checks(rows)
    assert checks["within_0.03_of_centralized"] and checks["leak_below_even_split"]
    assert checks["leak_below_median_random"]
    assert checks["accuracy_gap_to_centralized"] == pytest.approx(0.02)
    rows[2]["worst_leak"] = [0.45, 0.0]
    assert not target_checks(rows)["leak_below_median_random"]
    table = markdown_table(rows)
    assert table.count("\n") == 6 and "| engine (PPO) | `x` | 0.880 ± 0.010 |" in table


def test_cli_search_writes_outputs_loadable_by_train(tmp_path):
    from qumos.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["search", "--fragments", "2", "--max-depth", "1", "--max-evals", "2",
                            "--victim-epochs", "1", "--attack-epochs", "1", "--attack-restarts",
                            "1", "--method", "random", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["evaluations"] == 2 and res["fresh_evaluations"] == 2
    assert len((out / "designs.jsonl").read_text().splitlines()) == 2
    assert len((out / "designs.csv").read_text().splitlines()) == 3
    assert (out / "pareto.png").stat().st_size > 1000
    best = json.loads((out / "best.json").read_text())["best"]
    assert best["reward"] == max(json.loads(l)["reward"]
                                 for l in (out / "designs.jsonl").read_text().splitlines())
    t = runner.invoke(app, ["train", str(out / "best_design.yaml"), "--epochs", "1",
                            "--out", str(tmp_path / "art"), "--json"])
    assert t.exit_code == 0, t.output
    assert json.loads(t.stdout.strip().splitlines()[-1])["design"] == res["best"]
    bad = runner.invoke(app, ["search", "--fragments", "7", "--max-evals", "1", "--out",
                              str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--fragments" in bad.output
    bad = runner.invoke(app, ["search", "--rollout", "1", "--max-evals", "1", "--out",
                              str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--rollout" in bad.output


def test_victims_of_all_seeds_train_together_as_one_by_one():
    """The evaluator trains every seed's victim in one fit_many call: the same victims
    as train_design seed by seed."""
    from qumos.datasets import load_task
    from qumos.search.evaluator import train_victims
    from qumos.train import TrainConfig, train_design

    design = design_from_flags(fragments="1-1", block="ry_cz")
    cfg = EvalConfig(seeds=(0, 1), victim_epochs=2)
    datas = [load_task("digits", 4, seed=s) for s in cfg.seeds]
    specs, accs = train_victims(design, datas, cfg)
    for s, data, spec, acc in zip(cfg.seeds, datas, specs, accs):
        one, _, want = train_design(design, data, TrainConfig(epochs=2, seed=s))
        assert acc == pytest.approx(want, abs=1 / len(data.test.y))
        np.testing.assert_allclose(spec.fragments[0].params, one.fragments[0].params,
                                   atol=2e-3)
