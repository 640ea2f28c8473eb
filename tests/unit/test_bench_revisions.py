"""bench/bench_revisions.py: bad flags are refused before any work; a tiny comparison
against HEAD runs both trees and prints the ratio table."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_revisions.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )


def test_unknown_revision_and_bad_reps_are_refused():
    out = _run("--baseline", "no-such-revision")
    assert out.returncode == 2
    assert "--baseline: 'no-such-revision' is not a commit" in out.stderr
    out = _run("--baseline", "HEAD", "--reps", "0")
    assert out.returncode == 2
    assert "--reps is 0; allowed: 1 or more" in out.stderr


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_tiny_comparison_against_head(tmp_path):
    out = _run(
        "--baseline",
        "HEAD",
        "--designs",
        "ry_cz:1",
        "--seeds",
        "0",
        "--reps",
        "1",
        "--out",
        str(tmp_path / "t.md"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| ry_cz:1 |"))
    ratio = float(row.split("|")[4].strip().rstrip("x"))
    assert ratio > 0
    assert "baseline" in (tmp_path / "t.md").read_text()
