"""Run independent candidate evaluations: in-process, in a local process pool, or on Ray.

Every executor has `map(fn, items, done=None) -> list` (results in the order of `items`;
`done(i, result)` is called as each finishes) and `close()`. `fn` must be a picklable
top-level function. Workers use one torch thread each, so N workers use N cores. A
pool worker exits as soon as the process that started it dies, even by SIGKILL, so a
killed or crashed run leaves no worker behind (finished results are already in the
run's cache; the rerun resumes from it).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing.connection import wait as wait_ready
from typing import Any

from qumos.errors import QumosError

DoneFn = Callable[[int, Any], None]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _exit_with_parent() -> None:
    """Pool initializer: one torch thread, and a daemon thread that ends this worker when
    its parent dies. Without it a worker of a killed run blocks forever on the task
    queue (it holds that pipe's write end itself, so it never reads end-of-file)."""
    _init_worker()
    parent = mp.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch(sentinel: int) -> None:
        wait_ready([sentinel])
        os._exit(1)

    threading.Thread(target=watch, args=(parent.sentinel,), daemon=True).start()


class SerialExecutor:
    """Evaluate in this process, one after another (workers = 1)."""

    workers = 1

    def map(self, fn: Callable, items: Sequence, done: DoneFn | None = None) -> list:
        out = []
        for i, item in enumerate(items):
            out.append(fn(item))
            if done:
                done(i, out[-1])
        return out

    def close(self) -> None:
        pass


class PoolExecutor:
    """A local pool of `workers` spawned processes, kept for the executor's lifetime."""

    def __init__(self, workers: int):
        if workers < 1:
            raise QumosError(f"workers: {workers}; allowed: 1 or more")
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=mp.get_context("spawn"),
            initializer=_exit_with_parent,
        )

    def map(self, fn: Callable, items: Sequence, done: DoneFn | None = None) -> list:
        futures = {self._pool.submit(fn, item): i for i, item in enumerate(items)}
        out: list = [None] * len(items)
        for fut in as_completed(futures):
            i = futures[fut]
            out[i] = fut.result()
            if done:
                done(i, out[i])
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Tasks on a Ray cluster (`address` of an existing cluster, or "local": a new local
    instance with `workers` CPUs, shut down by `close()`), 1 CPU per task."""

    def __init__(self, address: str, workers: int | None = None):
        import ray

        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            kw: dict[str, Any] = {"num_cpus": workers or 1} if address == "local" else {}
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
                **kw,
            )
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote: dict[Callable, Any] = {}

    def map(self, fn: Callable, items: Sequence, done: DoneFn | None = None) -> list:
        ray = self._ray
        if fn not in self._remote:

            def call(item, _fn=fn):  # runs on a Ray worker
                _init_worker()
                return _fn(item)

            self._remote[fn] = ray.remote(num_cpus=1)(call)
        refs = [self._remote[fn].remote(item) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        out: list = [None] * len(items)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = index[ready[0]]
            out[i] = ray.get(ready[0])
            if done:
                done(i, out[i])
        return out

    def close(self) -> None:
        if self._owns:
            self._ray.shutdown()


def make_executor(workers: int = 1, ray_address: str | None = None):
    """Ray when an address is given, else a local pool for workers > 1, else serial."""
    if ray_address:
        return RayExecutor(ray_address, workers if workers > 1 else None)
    if workers < 1:
        raise QumosError(f"--workers: {workers}; allowed: 1 or more")
    return SerialExecutor() if workers == 1 else PoolExecutor(workers)
