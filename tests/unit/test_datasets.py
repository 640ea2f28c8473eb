import numpy as np
import pytest
from qumos.chain import preprocess
from qumos.datasets import load_task
from qumos.errors import DatasetError


@pytest.mark.parametrize(
    "dataset,task,classes",
    [("digits", 4, 4), ("digits", 2, 2), ("mnist-small", 2, 2), ("mnist-small", 4, 4)],
)
def test_tasks_load_with_seeded_splits(dataset, task, classes):
    a = load_task(dataset, task, seed=0)
    b = load_task(dataset, task, seed=0)
    c = load_task(dataset, task, seed=1)
    assert a.train.x.shape[1] == 16
    for s in (a.train, a.val, a.test):
        assert s.x.min() >= 0 and s.x.max() <= np.pi + 1e-12
        assert set(np.unique(s.y)) == set(range(classes))
    np.testing.assert_array_equal(a.test.raw, b.test.raw)
    assert not np.array_equal(a.test.raw, c.test.raw)
    n = len(a.train.y) + len(a.val.y) + len(a.test.y)
    assert abs(len(a.train.y) / n - 0.6) < 0.02
    # no sample is in two splits
    rows = {r.tobytes() for r in a.train.raw}
    assert not any(r.tobytes() in rows for r in a.test.raw) or dataset == "mnist-small"


def test_task_classes_follow_torchquantum():
    d = load_task("digits", 2)
    assert d.classes == [3, 6]
    assert load_task("digits", 4).classes == [0, 1, 2, 3]


def test_preprocess_is_avg_pooling():
    raw = np.arange(64, dtype=float)[None]  # one 8x8 image
    feats = preprocess(raw, load_task("digits", 4).preprocess)
    img = raw.reshape(8, 8)
    assert np.isclose(feats[0, 0], img[:2, :2].mean() / 16 * np.pi)


def test_missing_idx_files_are_named(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(DatasetError) as e:
        load_task("fashion-mnist", 4, data_dir=tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(e.value)
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)


def test_idx_files_are_read(tmp_path):
    import gzip
    import struct

    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + imgs.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBBI", 0, 8, 1, n) + labels.tobytes())
    d = load_task("mnist", 4, data_dir=tmp_path)
    assert len(d.train.y) + len(d.val.y) + len(d.test.y) == 28  # 7 per class x 4


def test_unknown_dataset_and_task():
    with pytest.raises(DatasetError, match="allowed"):
        load_task("cifar", 4)
    with pytest.raises(DatasetError, match="task"):
        load_task("digits", 3)


def test_raw_images_are_read_once_and_splits_are_copies(monkeypatch):
    """An evaluation loads one split per seed: the dataset is parsed once per process,
    kept read-only, and a split changed by its caller leaves the next load intact."""
    import qumos.datasets as ds

    ds._load_raw.cache_clear()
    reads = []
    real = ds._read_raw
    monkeypatch.setattr(ds, "_read_raw", lambda *a: reads.append(a) or real(*a))
    a = load_task("digits", 4, seed=1)
    a.train.raw[:] = -1
    a.train.x[:] = -1
    b = load_task("digits", 4, seed=1)
    c = load_task("digits", 4, seed=2)
    assert len(reads) == 1
    assert b.train.raw.min() >= 0 and b.train.x.min() >= 0
    assert not np.array_equal(b.train.y, c.train.y)
    raw, _ = ds._load_raw("digits", None)
    with pytest.raises(ValueError):
        raw[0, 0] = 1
    ds._load_raw.cache_clear()
