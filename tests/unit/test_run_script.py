"""`./run`: which test command lines prepare Docker, and its usage text."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "run"


@pytest.mark.parametrize(
    "args, docker",
    [
        ([], True),
        (["-q"], True),
        (["-m", "containers"], True),
        (["tests/containers"], True),
        (["tests/containers/test_compose_stack.py", "-x"], True),
        (["-m", "not containers"], False),
        (["-m", "not slow and not containers"], False),
        (["tests/unit"], False),
        (["-x", "tests/service"], False),
        (["-k", "containers", "tests/unit"], False),
    ],
)
def test_only_test_paths_decide_whether_docker_is_prepared(args, docker):
    script = (
        f"eval \"$(sed -n '/^wants_containers()/,/^}}/p' {RUN})\"; "
        'wants_containers "$@" && echo docker || echo none'
    )
    out = subprocess.run(
        ["bash", "-c", script, "run", *args], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ("docker" if docker else "none"), args


def test_usage_not_source_lines():
    r = subprocess.run(["bash", str(RUN)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("usage: ./run COMMAND")
    assert "setup" in r.stderr and "set -euo" not in r.stderr
    r = subprocess.run(["bash", str(RUN), "help"], capture_output=True, text=True)
    assert r.returncode == 0 and './run test -m "not containers"' in r.stdout


@pytest.mark.parametrize(
    "args, checks",
    [
        ([], True),
        (["-q", "--timeout=900"], True),
        (["-m", "not containers"], True),
        (["-k", "tests/unit"], True),
        (["tests/unit"], False),
        (["-x", "tests/service/test_provider.py"], False),
    ],
)
def test_the_whole_suite_starts_with_the_static_checks(args, checks):
    script = (
        f"eval \"$(sed -n '/^has_paths()/,/^}}/p' {RUN})\"; "
        'has_paths "$@" && echo paths || echo checks'
    )
    out = subprocess.run(
        ["bash", "-c", script, "run", *args], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ("checks" if checks else "paths"), args
