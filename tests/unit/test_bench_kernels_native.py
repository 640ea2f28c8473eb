"""bench/bench_kernels_native.py: refuses bad flags; a tiny run prints its table, both
builds giving the same outputs."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from qumos import kernels

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_kernels_native.py"


@pytest.mark.parametrize("flags", [["--reps", "0"], ["--steps", "0"]])
def test_bad_flags_are_refused(flags):
    res = subprocess.run([sys.executable, str(BENCH), *flags], capture_output=True, text=True)
    assert res.returncode == 2 and "allowed >= 1" in res.stderr


@pytest.mark.skipif(shutil.which(kernels.COMPILER[0]) is None, reason="no C compiler")
def test_tiny_run_prints_the_table():
    res = subprocess.run(
        [sys.executable, str(BENCH), "--reps", "1", "--steps", "1"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    rows = [line for line in res.stdout.splitlines() if re.match(r"\| \w+:", line)]
    assert len(rows) == 8, res.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        native, portable, ratio, diff = float(cells[2]), float(cells[3]), cells[4], float(cells[5])
        assert native > 0 and portable > 0 and ratio.endswith("x")
        assert diff < 1e-5  # the same maths in both builds
