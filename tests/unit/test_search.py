"""The security engine: design space, environment, evaluator, cache, PPO, executors, CLI.

Budgets are tiny (victim 1 epoch, attacker 1 epoch and 1 restart, one seed, depths 1-2)
but every evaluation is real: real training, real attacks.
"""

from __future__ import annotations

import json
import statistics
import sys
import warnings

import numpy as np
import pytest
from qumos.errors import DesignError, QumosError
from qumos.search.env import DesignEnv, DesignSpace, SequentialDesignEnv
from qumos.search.evaluator import (
    EvalCache,
    EvalConfig,
    Evaluator,
    code_revision,
    evaluate_design,
    old_reward,
    reward,
)
from qumos.search.evolution import evolution_search, mutate
from qumos.search.experiment import even_split
from qumos.search.report import markdown_table, median_in_search, table_row, target_checks
from qumos.search.search import Budget, pareto_front, ppo_search, random_search
from qumos.spec import Design, design_from_flags

from tests.support.experiments import TINY

CHEAP = EvalConfig(seeds=(0,), victim_epochs=1, attack_epochs=1, attack_restarts=1)
SMALL = {"depths": (1,)}


def _const_reward(design: Design):
    return float(sum(f.depth for f in design.fragments)), {}


@pytest.mark.parametrize(
    "space",
    [
        DesignSpace(n_fragments=3),
        DesignSpace(n_fragments=None),
        DesignSpace.centralized(),
        DesignSpace("mnist-small", 2, n_fragments=2),
    ],
)
def test_env_passes_check_env_without_warnings(space):
    from stable_baselines3.common.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(DesignEnv(space, _const_reward), warn=True)


@pytest.mark.parametrize(
    "space",
    [
        DesignSpace(n_fragments=3),
        DesignSpace(n_fragments=2),
        DesignSpace.centralized(),
        DesignSpace("mnist-small", 4, n_fragments=4, hiding=(False, True)),
    ],
)
def test_sequential_env_passes_check_env_and_builds_the_design(space):
    from stable_baselines3.common.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(SequentialDesignEnv(space, _const_reward), warn=True)
    # K steps build exactly the design the flat action encodes
    env = SequentialDesignEnv(space, _const_reward)
    rng = np.random.default_rng(1)
    for _ in range(20):
        want = space.sample(rng)
        flat = space.encode(want)
        obs, _ = env.reset()
        k = space.n_fragments
        tail = flat[4 * k :]
        for f in range(k):
            action = np.concatenate([flat[4 * f : 4 * f + 4], tail])
            assert env.observation_space.contains(obs)
            obs, r, term, trunc, info = env.step(action)
            assert term == (f == k - 1) and not trunc
            if f < k - 1:
                assert r == 0.0 and obs[len(space.observation()) + f + 1] == 1.0
        assert info["key"] == want.key() and r == _const_reward(want)[0]
    with pytest.raises(DesignError, match="fragments"):
        SequentialDesignEnv(DesignSpace(n_fragments=None), _const_reward)


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
    gain = max(0.0, max(a[0] for a in rec["attacker_acc"]) - rec["S"][0])  # S: best reference
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
    # Each stored record names the source revision that computed it; an old record
    # (written before the stamp) keeps loading, without one.
    stored = json.loads(cache_file.read_text().splitlines()[0])
    assert stored["code"] == code_revision() and len(stored["code"]) == 12
    old = {k: v for k, v in stored.items() if k != "code"}
    cache_file.write_text(json.dumps(old) + "\n")
    assert "code" not in EvalCache(cache_file).get(design, CHEAP)


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
    runs = [
        random_search(space, Evaluator(cfg, lam=0.0), Budget(max_evals=2), seed=3) for _ in range(2)
    ]
    assert [r["key"] for r in runs[0].records] == [r["key"] for r in runs[1].records]
    assert [r["victim_acc"] for r in runs[0].records] == [r["victim_acc"] for r in runs[1].records]


@pytest.mark.slow
def test_process_pool_matches_serial():
    from qumos.search.parallel import PoolExecutor, SerialExecutor, make_executor

    cfg = CHEAP.with_(attacks=False)
    jobs = [
        (design_from_flags(fragments=f, block="ry_cz").model_dump(), cfg) for f in ("1-1", "2-1")
    ]
    pool = make_executor(2)
    assert isinstance(pool, PoolExecutor)
    try:
        par = pool.map(evaluate_design, jobs)
    finally:
        pool.close()
    ser = SerialExecutor().map(evaluate_design, jobs)
    assert [r["victim_acc"] for r in par] == [r["victim_acc"] for r in ser]
    import os

    # evaluated in the pool's processes, not in this one
    assert ser[0]["pid"] == os.getpid() and all(r["pid"] != os.getpid() for r in par)
    with pytest.raises(QumosError, match="workers"):
        make_executor(0)


_KILLED_PARENT = """
import time
from qumos.search.parallel import PoolExecutor
pool = PoolExecutor(2)
pool.map(time.sleep, [0.5, 0.5])
print("ready", flush=True)
pool.map(time.sleep, [300, 300])
"""


def _pool_workers(parent: int) -> list[int]:
    from pathlib import Path

    pids = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmd:
            pids.append(int(d.name))
    return pids


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(120)
def test_pool_workers_exit_when_their_run_is_killed():
    """A SIGKILLed run (the OOM killer, `kill -9`, a lost session) leaves no worker
    behind: before the watchdog each one blocked forever holding 1.4 GB."""
    import os
    import signal
    import subprocess
    import time

    parent = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PARENT], stdout=subprocess.PIPE, text=True
    )
    workers: list[int] = []
    try:
        assert parent.stdout.readline().strip() == "ready"
        workers = _pool_workers(parent.pid)
        assert workers, "the pool started no worker"
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], "workers outlived their run"
    finally:
        parent.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


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


def _rec(acc, attackers, S, scratch, seeds=(100,)):
    leak = [min(1.0, max(0.0, (a - S) / (acc - S))) for a in attackers]
    return {
        "short": "x",
        "key": f"k{acc}{attackers}",
        "attacked": True,
        "seeds": list(seeds),
        "victim_acc": [acc, 0.0],
        "S": [S, 0.0],
        "scratch_acc": [scratch, 0.0],
        "worst_attacker_acc": [max(attackers), 0.0],
        "worst_gain": [max(0.0, max(attackers) - S), 0.0],
        "old_gain": [max(attackers) - scratch, 0.0],
        "security": [1 - max(leak), 0.01],
        "theft_ratio": [max(attackers) / acc, 0.0],
    }


def test_reward_is_clipped_and_old_reward_kept():
    # stolen fragments below S: the reward is the accuracy, never above it
    rec = _rec(0.9, [0.6, 0.7], S=0.8, scratch=0.5)
    assert reward(rec, 1.0) == pytest.approx(0.9)
    # the old formula (scratch S, not clipped) rewarded a design for being easy to learn
    assert old_reward(rec, 1.0) == pytest.approx(0.9 - 0.2)
    assert old_reward(_rec(0.9, [0.6], S=0.8, scratch=0.7), 1.0) == pytest.approx(1.0)
    assert reward(_rec(0.9, [0.85], S=0.8, scratch=0.7), 2.0) == pytest.approx(0.8)


def test_all_in_one_is_a_full_theft_measured_against_s():
    from qumos.search.report import all_in_one

    seeds = [
        {"seed": 100, "victim_acc": 0.9, "S": 0.7, "scratch": 0.6, "attacker_acc": [0.5, 0.6]},
        {"seed": 101, "victim_acc": 0.8, "S": 0.85, "scratch": 0.6, "attacker_acc": [0.5, 0.6]},
    ]
    rec = {**_rec(0.85, [0.6], S=0.775, scratch=0.6), "per_seed": seeds}
    out = all_in_one(rec)
    # seed 100: the thief holds the 0.9 model (leak 1); seed 101: the model is below S
    # (leak_value's rule: A = acc_victim >= acc_victim -> 1)
    assert [r["leak"] for r in out["per_seed"]] == [[1.0], [1.0]]
    assert out["security"] == [0.0, 0.0] and out["theft_ratio"] == [1.0, 0.0]
    assert out["worst_attacker_acc"] == pytest.approx([0.85, 0.05])
    assert out["worst_gain"] == pytest.approx([0.1, 0.1])  # max(0, acc - S) per seed
    assert reward(out, 1.0) == pytest.approx(0.85 - 0.1)
    assert out["victim_acc"] == rec["victim_acc"] and rec["security"] != out["security"]


def test_report_table_and_target_checks():
    def row(method, acc, attackers, S=0.6):
        held = {s: _rec(acc + 0.01 * s, attackers, S, 0.5) for s in (0, 1, 2)}
        return table_row(method, held, {0: 0.9, 1: 0.8, 2: 0.85}, 1.0)

    rows = [
        row("centralized search (K=1, lambda=0)", 0.90, [0.92]),
        row("even split into 3", 0.85, [0.8]),
        row("engine (PPO)", 0.88, [0.62]),
        row("random (best by reward)", 0.8, [0.7]),
        row("random (median design)", 0.7, [0.69]),
    ]
    assert rows[2]["accuracy"][0] == pytest.approx(0.89)
    # a row of several designs per search seed: entries "seed:offset", spread over designs
    mid = table_row(
        "random (middle 3 designs)",
        {f"{s}:{o:+d}": _rec(0.7, [0.64 + 0.01 * o], 0.6, 0.5) for s in (0, 1) for o in (-1, 0, 1)},
        None,
        1.0,
    )
    assert mid["search_seeds"] == [0, 1] and len(mid["keys"]) == 6
    assert mid["security"][1] > 0  # the designs differ; one seed's mean would hide it
    assert target_checks([*rows, mid], 0.3)["middle_random_security_lower_beyond_spread"]
    # each seed's final design by its key too: the short form omits the entanglement
    assert rows[2]["keys"] == {str(s): f"k{0.88 + 0.01 * s}[0.62]" for s in (0, 1, 2)}
    assert rows[2]["in_search_reward"] == pytest.approx([0.85, statistics.pstdev([0.9, 0.8, 0.85])])
    checks = target_checks(rows, value_gap=0.3)
    assert checks["carries_comparison"] and checks["engine_security_ge_0.7"]
    assert checks["engine_within_0.03_of_centralized"]
    assert checks["engine_accuracy_gap_to_centralized"] == pytest.approx(0.02)
    assert checks["even_split_security_lower_beyond_spread"]
    assert checks["median_random_security_lower_beyond_spread"]
    assert checks["engine_reward_above_random"]
    assert not target_checks(rows, value_gap=0.1)["carries_comparison"]
    # the more accurate centralized row is the one the engine is compared with
    more = [
        *rows,
        row("centralized, 3-fragment architectures on one provider (lambda=0)", 0.95, [0.95]),
    ]
    assert target_checks(more, 0.3)["engine_accuracy_gap_to_centralized"] == pytest.approx(0.07)
    assert not target_checks(more, 0.3)["engine_within_0.03_of_centralized"]
    rows[2] = row("engine (PPO)", 0.85, [0.8])  # as leaky as the even split
    assert not target_checks(rows, 0.3)["even_split_security_lower_beyond_spread"]
    table = markdown_table(rows)
    assert table.count("\n") == 6
    assert "| engine (PPO) | 0: `x`<br>1: `x`<br>2: `x` | 0.660 ± 0.008 | 0.860 ± 0.008 |" in table


def test_middle_designs_are_the_ones_around_the_median_by_reward():
    from qumos.search.experiment import _median_design, middle_designs

    recs = [{"key": k, "reward": r} for k, r in zip("abcdefg", (0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2))]
    # by reward: c .1, g .2, e .3, a .5, d .7, f .8, b .9
    mid = middle_designs(recs, 5)
    assert {o: r["key"] for o, r in mid.items()} == {-2: "g", -1: "e", 0: "a", 1: "d", 2: "f"}
    assert mid[0] is _median_design(recs)
    assert [r["key"] for r in middle_designs(recs, 1).values()] == ["a"]
    # fewer records than asked: all of them; an even count's median is the lower middle
    assert {o: r["key"] for o, r in middle_designs(recs[:2], 5).items()} == {0: "a", 1: "b"}


def test_median_in_search_counts_the_designs_that_clear_the_bars():
    recs = [
        {**_rec(0.9, [0.6], S=0.6, scratch=0.5), "reward": 0.9},  # secure (1.0), accurate
        {**_rec(0.8, [0.6], S=0.6, scratch=0.5), "reward": 0.8},  # secure, 0.1 below
        {**_rec(0.9, [0.85], S=0.6, scratch=0.5), "reward": 0.65},  # leaks: security 1/6
        {**_rec(0.88, [0.66], S=0.6, scratch=0.5), "reward": 0.82},  # security 0.79
    ]
    med = median_in_search(recs, acc_centralized=0.905)
    assert med["designs"] == 4 and med["reward"] == pytest.approx(0.81)
    assert med["share_secure"] == pytest.approx(0.75)
    assert med["share_secure_and_accurate"] == pytest.approx(0.5)  # 0.9 and 0.88 >= 0.875
    assert "share_secure_and_accurate" not in median_in_search(recs)
    assert median_in_search([]) == {}
    from qumos.search.report import _shares

    assert _shares(med).endswith("50% (in-search, one evaluation seed each).")
    assert _shares(med, 3).endswith("(in-search, each the mean of 3 evaluation seeds).")


def test_report_table_escapes_the_pipes_of_a_design():
    row = table_row("engine (PPO)", {0: _rec(0.9, [0.6], S=0.6, scratch=0.5)}, None, 1.0)
    row["designs"] = {0: "u3cu3:2-2-2|tanh|readout"}
    line = markdown_table([row]).splitlines()[-1]
    assert "`u3cu3:2-2-2\\|tanh\\|readout`" in line
    # the row still has the table's nine cells
    assert line.replace("\\|", "").count("|") == 10


def test_coalition_fields_leave_the_cached_fingerprints_alone():
    """Records cached before the coalition fields keep their keys; a coalition changes
    the fingerprint and reaches the attack configuration."""
    from qumos.search.evaluator import attack_config

    plain = EvalConfig(attack_fraction=0.01)
    assert plain.fingerprint() == "9ff1d2285e7c"  # the key of the committed 1% records
    by_size = plain.with_(attack_profile="coalition", attack_coalition_size=2)
    named = plain.with_(attack_profile="coalition", attack_coalition=("provider-a", "provider-b"))
    assert len({plain.fingerprint(), by_size.fingerprint(), named.fingerprint()}) == 3
    assert attack_config(by_size).coalition_size == 2
    assert attack_config(named).coalition == ("provider-a", "provider-b")


def test_report_names_the_coalition_and_the_labelled_images():
    from qumos.search.experiment import labelled_images
    from qumos.search.report import labelled_label, profile_label

    assert profile_label({"attack_profile": "breach"}) == "`breach`"
    assert (
        profile_label({"attack_profile": "coalition", "attack_coalition_size": 2})
        == "`coalition` (every coalition of up to 2 providers)"
    )
    assert labelled_label([1, 1, 1, 1]) == " (4 labelled images, 1 per class)"
    assert labelled_label([1, 2, 1, 2]) == " (6 labelled images, 1, 2, 1, 2 per class)"
    assert labelled_label(None) == ""
    # digits-4's training split: ~107 images per class
    assert labelled_images("digits", 4, 0.01, "data") == [1, 1, 1, 1]
    assert labelled_images("digits", 4, 0.02, "data") == [2, 2, 2, 2]


def test_evolution_respects_budget_and_seeds_differ(tmp_path):
    space = DesignSpace(n_fragments=2, **SMALL)
    cfg = CHEAP.with_(attacks=False)
    cache = EvalCache(tmp_path / "c.jsonl")
    runs = {}
    for seed in (0, 1):
        ev = Evaluator(cfg, lam=0.0, cache=cache)
        res = evolution_search(space, ev, Budget(max_evals=5), seed=seed, population=3, sample=2)
        assert len(res.records) == 5 and len(ev.seen) == 5  # exactly the budget
        assert len({r["key"] for r in res.records}) == 5
        runs[seed] = [r["key"] for r in res.records]
    assert runs[0] != runs[1]  # several search seeds give distinct runs
    again = evolution_search(
        space,
        Evaluator(cfg, lam=0.0, cache=cache),
        Budget(max_evals=5),
        seed=0,
        population=3,
        sample=2,
    )
    assert [r["key"] for r in again.records] == runs[0] and again.evaluations == 0
    rng = np.random.default_rng(0)
    a = space.encode(space.sample(rng))
    for _ in range(50):
        c = mutate(space, a, rng)
        assert (c != a).sum() == 1 and all(0 <= v < n for v, n in zip(c, space.nvec))
    with pytest.raises(ValueError, match="sample"):
        evolution_search(
            space, Evaluator(cfg, lam=0.0), Budget(max_evals=2), population=3, sample=5
        )


def test_ppo_policy_saved_on_one_task_warm_starts_another(tmp_path):
    cfg = CHEAP.with_(attacks=False)
    src = DesignSpace("digits", 2, n_fragments=2, **SMALL)
    ppo_search(
        src,
        Evaluator(cfg, lam=0.0),
        Budget(max_evals=2),
        seed=0,
        rollout=2,
        save_policy=tmp_path / "p.zip",
    )
    assert (tmp_path / "p.zip").stat().st_size > 1000
    dst = DesignSpace("digits", 4, n_fragments=2, **SMALL)
    res = ppo_search(
        dst,
        Evaluator(cfg, lam=0.0),
        Budget(max_evals=2),
        seed=0,
        rollout=2,
        init_policy=tmp_path / "p.zip",
    )
    assert len(res.records) == 2 and all(r["design"]["task"] == 4 for r in res.records)
    assert res.method == "ppo-warm"


def test_sequential_ppo_respects_budget(tmp_path):
    space = DesignSpace(n_fragments=2, **SMALL)
    ev = Evaluator(CHEAP.with_(attacks=False), lam=0.0)
    res = ppo_search(space, ev, Budget(max_evals=4), seed=0, rollout=2, sequential=True)
    assert len(res.records) == 4 and len(ev.seen) == 4 and res.method == "ppo-seq"
    assert res.extra["updates"] >= 1
    assert res.extra["policy_mode"].count("-") == 1  # a 2-fragment design


def test_cli_search_writes_outputs_loadable_by_train(tmp_path):
    from qumos.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(
        app,
        [
            "search",
            *TINY,
            "--max-evals",
            "2",
            "--method",
            "random",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["evaluations"] == 2 and res["fresh_evaluations"] == 2
    assert len((out / "designs.jsonl").read_text().splitlines()) == 2
    assert len((out / "designs.csv").read_text().splitlines()) == 3
    assert (out / "pareto.png").stat().st_size > 1000
    best = json.loads((out / "best.json").read_text())["best"]
    assert best["reward"] == max(
        json.loads(line)["reward"] for line in (out / "designs.jsonl").read_text().splitlines()
    )
    t = runner.invoke(
        app,
        [
            "train",
            str(out / "best_design.yaml"),
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "art"),
            "--json",
        ],
    )
    assert t.exit_code == 0, t.output
    assert json.loads(t.stdout.strip().splitlines()[-1])["design"] == res["best"]
    bad = runner.invoke(
        app, ["search", "--fragments", "7", "--max-evals", "1", "--out", str(tmp_path / "bad")]
    )
    assert bad.exit_code == 2 and "--fragments" in bad.output
    bad = runner.invoke(
        app, ["search", "--rollout", "1", "--max-evals", "1", "--out", str(tmp_path / "bad")]
    )
    assert bad.exit_code == 2 and "--rollout" in bad.output
    # open fragments: the smallest design has 2 providers, so a coalition is 1 of them
    bad = runner.invoke(
        app,
        ["search", "--fragments", "open", "--attack-profile", "coalition"]
        + ["--attack-coalition", "2", "--max-evals", "1", "--out", str(tmp_path / "bad")],
    )
    assert bad.exit_code == 2 and "--attack-coalition: 2 providers; allowed: 1 to 1" in bad.output
    bad = runner.invoke(
        app,
        ["search", "--fragments", "1", "--attack-profile", "coalition"]
        + ["--attack-coalition", "1", "--max-evals", "1", "--out", str(tmp_path / "bad")],
    )
    assert bad.exit_code == 2 and "a coalition needs designs of 2 or more" in bad.output


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
        np.testing.assert_allclose(spec.fragments[0].params, one.fragments[0].params, atol=2e-3)


def test_tiny_experiment_end_to_end_on_digits_2_resumes(tmp_path):
    """Every method, two search seeds, held-out figures, report, plots; a rerun evaluates
    nothing again."""
    from qumos.cli import app
    from typer.testing import CliRunner

    out = tmp_path / "exp"
    args = [
        "experiment",
        "--tasks",
        "digits-2",
        "--fractions",
        "0.05",
        "--methods",
        "random,evolution,ppo,ppo-seq",
        "--search-seeds",
        "0,1",
        "--heldout-seeds",
        "100",
        "--gap-fractions",
        "0.5",
        "--max-evals",
        "3",
        "--centralized-evals",
        "2",
        "--out",
        str(out),
        "--json",
        *TINY,
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "digits-2" / "result.json").read_text())
    st = res["settings"][0]
    methods = [row["method"] for row in st["rows"]]
    assert methods == [
        "centralized search (K=1, lambda=0)",
        "centralized, 2-fragment architectures on one provider (lambda=0)",
        "even split into 2",
        "random (best by reward)",
        "random (median design)",
        "random (middle 5 designs)",
        "regularized evolution",
        "engine (PPO)",
        "engine (PPO, sequential)",
    ]
    assert all(row["search_seeds"] == [0, 1] for row in st["rows"])
    # the designs around the median: all 3 of each 3-design search, one entry per design;
    # offset 0 is the median design
    mid, med = st["rows"][5], st["rows"][4]
    assert sorted(mid["keys"]) == [f"{s}:{o}" for s in (0, 1) for o in ("+0", "+1", "-1")]
    assert all(mid["keys"][f"{s}:+0"] == med["keys"][str(s)] for s in (0, 1))
    assert "middle_random_security_lower_beyond_spread" in st["checks"]
    # the all-in-one row: 2-fragment designs, a breach of the one provider is a full theft
    aio = st["rows"][1]
    assert all(d.count("-") == 1 for d in aio["designs"].values())
    assert aio["theft_ratio"][0] == 1.0 and aio["worst_attacker_acc"] == aio["accuracy"]
    assert st["centralized_compared"] in methods[:2]
    # the searches: 2 x 2 centralized + 4 methods x 2 seeds, each within its budget
    searches = [
        json.loads(line) for line in (out / "digits-2" / "searches.jsonl").read_text().splitlines()
    ]
    assert len(searches) == 12
    assert all(
        s["evaluations"] <= (2 if "centralized" in s["id"] or "n=2" in s["id"] else 3)
        for s in searches
    )
    by = {(s["method"], s["seed"]): s["keys"] for s in searches if "n=3" in s["id"]}
    assert by[("random", 0)] != by[("random", 1)]
    # held-out records: evaluated on the held-out seed only, never on the search's seed
    cache = [
        json.loads(line) for line in (out / "digits-2" / "cache.jsonl").read_text().splitlines()
    ]
    held = [c for c in cache if c["seeds"] == [100]]
    finals = {d for row in st["rows"] for d in row["designs"].values()}
    assert finals <= {c["short"] for c in held} and all(c["attacked"] for c in held)
    assert all(c["seeds"] in ([0], [100]) for c in cache)
    assert (out / "digits-2" / "pareto-fraction-0.05.png").stat().st_size > 1000
    report = (out / "README.md").read_text()
    assert "Value gap" in report and "engine (PPO, sequential)" in report
    assert res["designs_per_hour_per_core"] > 0
    gap_only = res["settings"][1]  # --gap-fractions: the value gap, no searches
    assert gap_only["fraction"] == 0.5 and len(gap_only["rows"]) == 3
    cen = next(row for row in gap_only["rows"] if row["method"] == gap_only["centralized_compared"])
    assert cen["accuracy"][0] == max(row["accuracy"][0] for row in gap_only["rows"][:2])
    assert gap_only["value_gap"] == pytest.approx(cen["accuracy"][0] - gap_only["S"][0])
    # resume: nothing evaluated or searched again
    n_cache = len(cache)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert len((out / "digits-2" / "cache.jsonl").read_text().splitlines()) == n_cache
    assert len((out / "digits-2" / "searches.jsonl").read_text().splitlines()) == 12
    assert len((out / "commands.txt").read_text().splitlines()) == 1  # not twice


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--seeds", "0,100"], "--heldout-seeds"),
        (["--attack-profile", "queries", "--attack-queries", "0"], "--attack-queries"),
        (["--tasks", "mnist-4"], "--tasks"),
        (["--tasks", "digits-3"], "--tasks"),
        (["--methods", "random,annealing"], "--methods"),
        (["--search-seeds", "1,1"], "--search-seeds"),
        (["--fractions", "0"], "--fractions"),
        (["--hiding", "maybe"], "--hiding"),
        (["--middle-random", "4"], "--middle-random: 4; allowed: an odd number"),
        (["--middle-random", "0"], "--middle-random"),
        (["--gap-fractions", "0.01"], "--gap-fractions"),
        (["--methods", "ppo-warm"], "--warm-start"),
        (["--methods", "ppo-warm", "--warm-start", "nowhere"], "--warm-start"),
        # digits-4: 4 labelled images (1 per class) at both
        (["--fractions", "0.005,0.0075"], "--fractions: 0.005 and 0.0075"),
        (["--attack-profile", "coalition"], "--attack-coalition"),
        (["--attack-coalition", "2"], "--attack-coalition: only --attack-profile coalition"),
        (["--attack-profile", "coalition", "--attack-coalition", "3"], "--attack-coalition: 3"),
        (
            ["--attack-profile", "coalition", "--attack-coalition", "provider-a,provider-d"],
            "--attack-coalition: ['provider-d']",
        ),
    ],
)
def test_experiment_rejects_inconsistent_flags_before_work(tmp_path, extra, flag):
    from qumos.cli import app
    from typer.testing import CliRunner

    out = tmp_path / "bad"
    r = CliRunner().invoke(
        app, ["experiment", "--out", str(out), "--data-dir", str(tmp_path / "nodata"), *extra]
    )
    assert r.exit_code == 2 and flag in r.output, r.output
    assert not out.exists()  # failed before any work


def test_report_lists_a_run_once_whatever_its_workers(tmp_path):
    """commands.txt keeps one line per run: re-running with another --workers (same
    figures) adds nothing; the README shows each run once."""
    from qumos.search.report import write_report

    a = "qumos experiment --tasks digits-2 --fractions 0.01 --workers 1 --out x"
    write_report(tmp_path, a)
    write_report(tmp_path, a.replace("--workers 1", "--workers 2"))
    write_report(tmp_path, a.replace("--workers 1", "--workers=2"))
    b = a.replace("0.01", "0.05")
    write_report(tmp_path, b)
    assert (tmp_path / "commands.txt").read_text().splitlines() == [a, b]
    readme = (tmp_path / "README.md").read_text()
    assert readme.count("--tasks digits-2") == 2
