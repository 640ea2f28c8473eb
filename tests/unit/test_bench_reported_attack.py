"""bench/bench_reported_attack.py: bad flags are refused before any work; on a tiny
experiment it re-evaluates the reported designs on the held-out seeds under twice the
attacker's steps and restarts, prints the table, and a rerun evaluates nothing again;
given the same experiment on two disjoint sets of held-out seeds, it pools them."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.experiments import TINY

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_reported_attack.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def _tiny_experiment(out: Path, heldout: str = "100") -> Path:
    from qumos.cli import app
    from typer.testing import CliRunner

    args = [
        *"experiment --tasks digits-2 --fractions 0.05 --methods random".split(),
        *f"--search-seeds 0 --heldout-seeds {heldout} --max-evals 2".split(),
        *"--centralized-evals 1".split(),
        *("--out", str(out), "--json", *TINY),
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return out / "digits-2" / "result.json"


def test_bad_flags_are_refused(tmp_path):
    out = _run("--result", str(tmp_path / "none.json"))
    assert out.returncode == 2 and "--result:" in out.stderr and "is not a file" in out.stderr
    result = _tiny_experiment(tmp_path / "exp")
    out = _run("--result", str(result), "--rows", "no such row")
    assert out.returncode == 2 and "--rows: ['no such row'] not in this setting" in out.stderr
    out = _run("--result", str(result), "--fraction", "0.3")
    assert out.returncode == 2 and "--fraction: 0.3; this result has 0.05" in out.stderr
    out = _run("--result", str(result), "--workers", "0")
    assert out.returncode == 2 and "--workers: 0; allowed: 1 or more" in out.stderr

    # a tiny run: the engine-free experiment's random rows under the three budgets
    rows = "random (best by reward),even split into 2"
    bench_out = tmp_path / "check"
    args = ("--result", str(result), "--rows", rows, "--workers", "1", "--out", str(bench_out))
    first = _run(*args)
    assert first.returncode == 0, first.stderr
    assert "2x steps: 2 of 2 designs to evaluate on seeds [100]" in first.stdout
    assert "| random (best by reward) | security |" in first.stdout
    assert "| even split into 2 | reward |" in first.stdout
    assert "Largest drop of a row's mean held-out security" in first.stdout
    cached = [json.loads(line) for line in (bench_out / "cache.jsonl").read_text().splitlines()]
    # two designs x two stronger budgets, each on the held-out seed only
    assert len(cached) == 4 and all(r["seeds"] == [100] for r in cached)
    assert len({r["fingerprint"] for r in cached}) == 2  # one per stronger budget
    again = _run(*args)
    assert again.returncode == 0, again.stderr
    assert "2x steps: 0 of 2 designs to evaluate" in again.stdout
    assert "2x restarts: 0 of 2 designs to evaluate" in again.stdout
    assert (bench_out / "README.md").read_text().count("| security |") >= 2

    # the rows name their designs by key: a short form shared by two designs (they
    # differ only in entanglement) is resolved by the key; a result.json written before
    # keys, whose short form is ambiguous, is refused with what to do
    res = json.loads(result.read_text())
    exp_cache = result.parent / "cache.jsonl"
    records = [json.loads(line) for line in exp_cache.read_text().splitlines()]
    even = next(r for r in res["settings"][0]["rows"] if r["method"] == "even split into 2")
    assert set(even["keys"]) == set(even["designs"]) == {"0"}
    rec = next(r for r in records if r["key"] == even["keys"]["0"])
    twin = json.loads(json.dumps(rec))
    for f in twin["design"]["fragments"]:
        f["entanglement"] = "full" if f["entanglement"] != "full" else "ring"
    twin["key"] = "0" * 16
    with exp_cache.open("a") as fh:
        fh.write(json.dumps(twin) + "\n")
    by_key = _run(*args)
    assert by_key.returncode == 0, by_key.stderr
    assert "2x steps: 0 of 2 designs to evaluate" in by_key.stdout
    for row in res["settings"][0]["rows"]:
        row.pop("keys")
    old = tmp_path / "exp" / "digits-2" / "old-result.json"
    old.write_text(json.dumps(res))
    refused = _run("--result", str(old), "--rows", "even split into 2", "--out", str(bench_out))
    assert refused.returncode == 2
    assert "row 'even split into 2' names" in refused.stderr and "rerun" in refused.stderr

    # a row of several designs per search seed (entries "seed:offset") is read too
    mid = _run(
        "--result", str(result), "--rows", "random (middle 5 designs)", "--out", str(bench_out)
    )
    assert mid.returncode == 0, mid.stderr
    assert "| random (middle 5 designs), search seed 0, median: `" in mid.stdout
    assert "| random (middle 5 designs), search seed 0, median +1: `" in mid.stdout


def test_two_held_out_seed_sets_are_pooled(tmp_path):
    first = _tiny_experiment(tmp_path / "a", "100")
    # the same experiment rerun into a copy of its output on another held-out seed
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    second = _tiny_experiment(tmp_path / "b", "101")
    refused = _run("--result", str(first), "--result", str(first))
    assert refused.returncode == 2 and "--result:" in refused.stderr
    assert "held-out seeds [100] used by another run" in refused.stderr

    out = tmp_path / "pooled"
    rows = "random (best by reward),even split into 2"
    args = ["--result", str(first), "--result", str(second), "--rows", rows, "--workers", "1"]
    r = _run(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    # each run's designs on its own held-out seeds, under each stronger budget
    assert "2x steps: 2 of 2 designs to evaluate on seeds [100]" in r.stdout
    assert "2x steps: 2 of 2 designs to evaluate on seeds [101]" in r.stdout
    cached = [json.loads(line) for line in (out / "cache.jsonl").read_text().splitlines()]
    assert sorted(rec["seeds"][0] for rec in cached) == [100] * 4 + [101] * 4
    readme = (out / "README.md").read_text()
    assert "Held-out seeds [100, 101] (pooled over the runs)" in readme
    assert f"--result {first} --result {second}" in readme

    # the pooled default figure is the mean over both seeds of each run's own record
    from qumos.search.evaluator import EvalCache, EvalConfig

    res = json.loads(first.read_text())
    even = next(x for x in res["settings"][0]["rows"] if x["method"] == "even split into 2")
    ec = res["eval_config"]
    cfg = EvalConfig(**{**ec, "seeds": tuple(ec["seeds"]), "strategies": tuple(ec["strategies"])})
    secs = []
    for path, seed in ((first, 100), (second, 101)):
        recs = EvalCache(path.parent / "cache.jsonl").records.values()
        want = cfg.with_(attack_fraction=0.05, seeds=(seed,)).fingerprint()
        secs += [
            x["security"][0]
            for x in recs
            if x["key"] == even["keys"]["0"] and x["fingerprint"] == want
        ]
    assert len(secs) == 2
    line = next(
        x for x in r.stdout.splitlines() if x.startswith("| even split into 2 | security |")
    )
    assert line.split("|")[3].strip().startswith(f"{(secs[0] + secs[1]) / 2:.3f}")
