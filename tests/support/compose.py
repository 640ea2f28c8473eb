"""Run docker compose v2 (`docker compose`) or v1 (`docker-compose`), whichever exists.

QUMOS_COMPOSE="docker compose" (or "docker-compose") forces one. Used by the container
tests and by .ci/run (`python3 tests/support/compose.py ARGS...` runs compose).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class DockerUnavailable(RuntimeError):
    """No docker engine or no compose: the reason, for a loud failure."""


@lru_cache(maxsize=1)
def compose_cmd() -> tuple[str, ...]:
    forced = os.environ.get("QUMOS_COMPOSE")
    if forced:
        return tuple(shlex.split(forced))
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return ("docker", "compose")
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    raise DockerUnavailable(
        "neither `docker compose` (v2) nor `docker-compose` (v1) is "
        "installed (Debian: apt-get install docker-compose)"
    )


def docker_problem() -> str | None:
    """None if the engine answers, else why not."""
    if not shutil.which("docker"):
        return "the docker CLI is not installed (Debian: apt-get install docker.io)"
    r = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        return (
            "the Docker engine is not reachable (start it: dockerd >/tmp/dockerd.log "
            f"2>&1 &): {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
        )
    try:
        compose_cmd()
    except DockerUnavailable as e:
        return str(e)
    return None


def compose(
    project: str,
    *args: str,
    env: dict | None = None,
    check: bool = True,
    timeout: float = 900,
    capture: bool = True,
) -> subprocess.CompletedProcess:
    cmd = [*compose_cmd(), "-p", project, "-f", str(ROOT / "docker-compose.yml"), *args]
    r = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        text=True,
        capture_output=capture,
        timeout=timeout,
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def docker(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(
            f"docker {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        )
    return r


if __name__ == "__main__":
    os.chdir(ROOT)
    os.execvp(compose_cmd()[0], [*compose_cmd(), *sys.argv[1:]])
