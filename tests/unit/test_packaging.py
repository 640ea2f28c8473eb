"""Every package of the library and the services goes into the wheel the images install
(setuptools' explicit package list: a forgotten subpackage works in the editable .venv
and fails only in a container)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_directory_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    roots = {name: ROOT / path for name, path in cfg["package-dir"].items()}
    found = set()
    for name, root in roots.items():
        for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
            if "__pycache__" in d.parts or not any(d.glob("*.py")):
                continue
            rel = d.relative_to(root).parts
            found.add(".".join((name, *rel)))
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"


def _name(req: str) -> str:
    return re.split(r"[\[<>=!~;@ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_the_lock_pins_every_requirement_and_no_path():
    """requirements.lock (the constraint file of every install) pins each dependency the
    project declares, and never a path or URL (pip-compile pins the project itself at the
    checkout's path unless told not to: that broke installs from any other directory)."""
    lock = (ROOT / "requirements.lock").read_text()
    assert not re.search(r"(?m)^\S+ @ ", lock), "a path or URL pin in requirements.lock"
    pins = {n.lower().replace("_", "-") for n in re.findall(r"(?m)^([A-Za-z0-9_.\-]+)==", lock)}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for reqs in project["optional-dependencies"].values():
        declared |= {_name(r) for r in reqs if _name(r) != project["name"]}
    assert declared <= pins, f"not pinned in requirements.lock: {sorted(declared - pins)}"
