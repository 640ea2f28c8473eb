"""Every package of the library and the services goes into the wheel the images install
(setuptools' explicit package list: a forgotten subpackage works in the editable .venv
and fails only in a container)."""

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
