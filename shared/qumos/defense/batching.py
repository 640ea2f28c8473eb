"""Cross-client dynamic batching: the rows of requests that arrive within `window_s`
(or until `max_rows` rows) go through the chain as one batch, in a secret random order,
and each request gets its own rows' answers back.

With the orchestrator's canaries mixed into every provider call, a provider (or an
insider reading its log) sees one call of many clients' rows, shuffled: it cannot tell
which rows belong to which request. A request alone in its window waits `window_s`.

At most `max_inflight` batches of a group run at once: when the window ends while that
many are in flight, the batch keeps collecting until one finishes (Triton's dynamic
batcher does the same with its queue), so under load the batches grow instead of
multiplying. `waits` holds each request's time from arrival to dispatch (what batching
adds to its latency), `sizes` the requests per batch.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import numpy as np


class Batcher:
    """`await submit(group, rows)` -> `run(group, all_rows)`'s answers for `rows`.
    `run` takes (group, (N, d) rows) and returns (N, ...) answers in the same order."""

    def __init__(
        self,
        run: Callable[[str, np.ndarray], Awaitable[np.ndarray]],
        window_s: float,
        max_rows: int,
        max_inflight: int = 2,
        on_dispatch: Callable[[list[float], int], None] | None = None,
    ):
        if window_s < 0 or max_rows < 1 or max_inflight < 1:
            raise ValueError(
                f"batching: window {window_s} s, max_rows {max_rows}, max_inflight {max_inflight}"
            )
        self.run, self.window_s, self.max_rows = run, window_s, max_rows
        self.max_inflight, self.on_dispatch = max_inflight, on_dispatch
        self.inflight: dict[str, int] = {}
        self.expired: set[str] = set()  # window over, waiting for a free slot
        self.waits: list[float] = []  # seconds from arrival to dispatch (last 10000)
        self.pending: dict[str, list[tuple[np.ndarray, asyncio.Future, float]]] = {}
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
        self.pending.setdefault(group, []).append((rows, fut, loop.time()))
        self.rows[group] = self.rows.get(group, 0) + len(rows)
        if self.rows[group] >= self.max_rows:
            self._flush(group)
        elif group not in self.timers and group not in self.expired:
            self.timers[group] = loop.call_later(self.window_s, self._window_over, group)
        return await fut

    def _window_over(self, group: str) -> None:
        self.timers.pop(group, None)
        if self.inflight.get(group, 0) >= self.max_inflight:
            self.expired.add(group)  # dispatched when a running batch finishes
        else:
            self._flush(group)

    def _flush(self, group: str) -> None:
        t = self.timers.pop(group, None)
        if t is not None:
            t.cancel()
        self.expired.discard(group)
        items = self.pending.pop(group, [])
        self.rows.pop(group, None)
        if items:
            loop = asyncio.get_running_loop()
            now = loop.time()
            waits = [now - t0 for _, _, t0 in items]
            self.batches += 1
            self.sizes = (self.sizes + [len(items)])[-1000:]
            self.waits = (self.waits + waits)[-10000:]
            if self.on_dispatch is not None:
                self.on_dispatch(waits, len(items))
            self.inflight[group] = self.inflight.get(group, 0) + 1
            loop.create_task(self._dispatch(group, items))

    async def _dispatch(self, group: str, items: list) -> None:
        try:
            await self._dispatch_rows(group, items)
        finally:
            self.inflight[group] -= 1
            if group in self.expired:
                self._flush(group)

    async def _dispatch_rows(self, group: str, items: list) -> None:
        sizes = [len(r) for r, _, _ in items]
        rows = np.concatenate([r for r, _, _ in items])
        order = _permutation(len(rows))  # position i of the batch holds row order[i]
        try:
            out = await self.run(group, rows[order])
        except BaseException as e:  # every request of the batch gets the error
            for _, fut, _ in items:
                if not fut.done():
                    fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        back = np.empty_like(out)
        back[order] = out
        start = 0
        for (_, fut, _), n in zip(items, sizes):
            if not fut.done():
                fut.set_result(back[start : start + n])
            start += n


def _permutation(n: int) -> np.ndarray:
    """A secret random order (the OS's randomness: no seed a provider could guess)."""
    return np.random.default_rng(secrets.randbits(128)).permutation(n)


__all__ = ["Batcher"]
