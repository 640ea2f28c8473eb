"""bench/pool_heldout.py and qumos.search.pooled: the same experiment on disjoint held-out
seeds, pooled into one table; runs that are not that are refused, naming the flag."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.experiments import TINY

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "pool_heldout.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def _experiment(out: Path, heldout: str, fraction: str = "0.05") -> Path:
    from qumos.cli import app
    from typer.testing import CliRunner

    args = [
        *f"experiment --tasks digits-2 --fractions {fraction} --methods random,ppo".split(),
        *f"--search-seeds 0,1 --heldout-seeds {heldout} --max-evals 2".split(),
        *("--centralized-evals", "1", "--middle-random", "1", "--out", str(out), "--json"),
        *TINY,
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return out / "digits-2" / "result.json"


def test_pool_records_joins_seeds_and_refuses_mixtures():
    from qumos.search.evaluator import pool_records, summarize

    def rec(key: str, seeds: list[int], sec: float) -> dict:
        rows = [
            {
                "seed": s,
                "victim_acc": 0.9,
                "scratch": 0.5,
                "S": 0.6,
                "S_reference": "knn",
                "attacker_acc": [0.6 + 0.3 * (1 - sec)],
                "leak": [1 - sec],
                "security": sec,
                "gain": 0.3 * (1 - sec),
                "gain_scratch": 0.1,
                "theft_ratio": 0.8,
            }
            for s in seeds
        ]
        return {"key": key, "attacked": True, "fingerprint": f"f{seeds[0]}", **summarize(rows)}

    both = pool_records([rec("a", [100, 101], 1.0), rec("a", [110], 0.4)])
    assert both["seeds"] == [100, 101, 110]
    assert both["security"][0] == pytest.approx(0.8)  # the mean over all three seeds
    assert both["victim_acc"] == [pytest.approx(0.9), pytest.approx(0.0)]
    with pytest.raises(ValueError, match="different designs"):
        pool_records([rec("a", [100], 1.0), rec("b", [110], 1.0)])
    with pytest.raises(ValueError, match="overlapping evaluation seeds"):
        pool_records([rec("a", [100], 1.0), rec("a", [100], 1.0)])


def test_pooling_two_held_out_seed_sets(tmp_path):
    first = _experiment(tmp_path / "a", "100")
    # the same experiment in a copy of its output, held out on another seed: the searches
    # replay from the cache, the held-out evaluations are new
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    second = _experiment(tmp_path / "b", "101")
    out = tmp_path / "pooled"
    r = _run("--result", str(first), "--result", str(second), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "| seed 100 | seed 101 | all 2 seeds |" in r.stdout
    assert "| engine above random (median design) |" in r.stdout
    pooled = json.loads((out / "pooled.json").read_text())
    assert pooled["heldout_seeds"] == [100, 101]
    a, b = (json.loads(p.read_text())["settings"][0] for p in (first, second))
    for i, row in enumerate(pooled["rows"]):
        assert row["keys"] == a["rows"][i]["keys"] == b["rows"][i]["keys"]
        # one seed per run: a design's pooled figure is the mean of its two records, so the
        # row's mean is the mean of the runs' row means
        for fig in ("security", "accuracy", "reward"):
            want = (a["rows"][i][fig][0] + b["rows"][i][fig][0]) / 2
            assert row[fig][0] == pytest.approx(want), (row["method"], fig)
    assert set(pooled["checks"]) == set(a["checks"])
    assert "Command: `python bench/pool_heldout.py --result" in (out / "README.md").read_text()

    # refused before any output, naming the flag
    r = _run("--result", str(first))
    assert r.returncode == 2 and "--result: give two runs or more" in r.stderr
    r = _run("--result", str(first), "--result", str(first))
    assert r.returncode == 2 and "held-out seeds [100] used by another run" in r.stderr
    r = _run("--result", str(first), "--result", str(tmp_path / "none.json"))
    assert r.returncode == 2 and "is not a file" in r.stderr
    r = _run("--result", str(first), "--result", str(second), "--fraction", "0.3")
    assert r.returncode == 2 and "no setting at fraction 0.3; it has 0.05" in r.stderr
    other = _experiment(tmp_path / "c", "102", fraction="0.5")
    r = _run("--result", str(first), "--result", str(other))
    assert r.returncode == 2 and "another experiment than" in r.stderr
