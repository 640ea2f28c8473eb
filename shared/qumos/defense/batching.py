"""Cross-client dynamic batching: the rows of requests that arrive within `window_s`
(or until `max_rows` rows) go through the chain as one batch, in a secret random order,
and each request gets its own rows' answers back.

With the orchestrator's canaries mixed into every provider call, a provider (or an
insider reading its log) sees one call of many clients' rows, shuffled: it cannot tell
which rows belong to which request. A request alone in its window waits `window_s`.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import numpy as np


class Batcher:
    """`await submit(group, rows)` -> `run(group, all_rows)`'s answers for `rows`.
    `run` takes (group, (N, d) rows) and returns (N, ...) answers in the same order."""

    def __init__(self, run: Callable[[str, np.ndarray], Awaitable[np.ndarray]],
                 window_s: float, max_rows: int):
        if window_s < 0 or max_rows < 1:
            raise ValueError(f"batching: window {window_s} s, max_rows {max_rows}")
        self.run, self.window_s, self.max_rows = run, window_s, max_rows
        self.pending: dict[str, list[tuple[np.ndarray, asyncio.Future]]] = {}
        self.rows: dict[str, int] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.batches = 0  # dispatched batches (tests, metrics)
        self.sizes: list[int] = []  # requests per dispatched batch (last 1000)

    async def submit(self, group: str, rows: np.ndarray) -> np.ndarray:
        if len(rows) >= self.max_rows:  # a full batch by itself
            return await self.run(group, rows)
        loop = asyncio.get_running_loop()
        if self.rows.get(group, 0) + len(rows) > self.max_rows:
            self._flush(group)
        fut = loop.create_future()
        self.pending.setdefault(group, []).append((rows, fut))
        self.rows[group] = self.rows.get(group, 0) + len(rows)
        if self.rows[group] >= self.max_rows:
            self._flush(group)
        elif group not in self.timers:
            self.timers[group] = loop.call_later(self.window_s, self._flush, group)
        return await fut

    def _flush(self, group: str) -> None:
        t = self.timers.pop(group, None)
        if t is not None:
            t.cancel()
        items = self.pending.pop(group, [])
        self.rows.pop(group, None)
        if items:
            self.batches += 1
            self.sizes = (self.sizes + [len(items)])[-1000:]
            asyncio.get_running_loop().create_task(self._dispatch(group, items))

    async def _dispatch(self, group: str, items: list) -> None:
        sizes = [len(r) for r, _ in items]
        rows = np.concatenate([r for r, _ in items])
        order = _permutation(len(rows))  # position i of the batch holds row order[i]
        try:
            out = await self.run(group, rows[order])
        except BaseException as e:  # every request of the batch gets the error
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        back = np.empty_like(out)
        back[order] = out
        start = 0
        for (_, fut), n in zip(items, sizes):
            if not fut.done():
                fut.set_result(back[start:start + n])
            start += n


def _permutation(n: int) -> np.ndarray:
    """A secret random order (the OS's randomness: no seed a provider could guess)."""
    return np.random.default_rng(secrets.randbits(128)).permutation(n)


__all__ = ["Batcher"]
