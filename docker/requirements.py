#!/usr/bin/env python3
"""Print, one per line, the Python requirements the container images install.

Reads pyproject.toml: the core dependencies plus the extras the images use
(provider, orchestrator, attacker and what they pull in, e.g. attacker ->
qumos[train], provider -> qumos[quantum]), plus the build-system requirements (`pip install /src` builds
the project with setuptools, which must then come from the wheelhouse too).
torch is pinned to the CPU build the project tests with: an unpinned torch
resolves to a multi-GB CUDA build. The versions come from requirements.lock, which
every install passes as a constraint file (`pip install -r ... -c requirements.lock`).

    docker/requirements.py [--pyproject FILE] [EXTRA ...]
        (default file: the repository's; default extras: provider orchestrator attacker)
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"


def requirements(extras: list[str], pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    meta = tomllib.loads(pyproject.read_text())
    project = meta["project"]
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = list(meta.get("build-system", {}).get("requires", []))
    out += project["dependencies"]
    seen: set[str] = set()

    def add_extra(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            sys.exit(f"extra {extra!r} not in pyproject.toml; allowed: {', '.join(optional)}")
        seen.add(extra)
        for req in optional[extra]:
            m = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", req.strip())
            if m:  # a self-reference such as qumos[train]
                for sub in m.group(1).split(","):
                    add_extra(sub.strip())
            else:
                out.append(req)

    for extra in extras:
        add_extra(extra)
    # torch: the pinned CPU build
    out = [TORCH_PIN if re.match(r"^torch\b", r) else r for r in out]
    unique: list[str] = []
    for r in out:
        if r not in unique:
            unique.append(r)
    return unique


if __name__ == "__main__":
    args = sys.argv[1:]
    path = ROOT / "pyproject.toml"
    if args[:1] == ["--pyproject"]:
        path, args = Path(args[1]), args[2:]
    for line in requirements(args or ["provider", "orchestrator", "attacker"], path):
        print(line)
