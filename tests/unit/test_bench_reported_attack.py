"""bench/bench_reported_attack.py: bad flags are refused before any work; on a tiny
experiment it re-evaluates the reported designs on the held-out seeds under twice the
attacker's steps and restarts, prints the table, and a rerun evaluates nothing again."""

import json
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


def _tiny_experiment(out: Path) -> Path:
    from qumos.cli import app
    from typer.testing import CliRunner

    args = [
        *"experiment --tasks digits-2 --fractions 0.05 --methods random".split(),
        *"--search-seeds 0 --heldout-seeds 100 --max-evals 2 --centralized-evals 1".split(),
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
