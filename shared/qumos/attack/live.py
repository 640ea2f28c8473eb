"""The attacker against running services: queries through the public API, its own rows
attributed in the breached provider's real `access.jsonl`.

How a real insider attributes its rows (what `HttpOracle.rows` does):
- it sends its queries one image per request and notes when each request left and when
  its answer came back; the provider writes each executed call to its log with the time,
  so the candidate entries of query i are those of the fragment logged inside its window;
- the orchestrator mixes integrity canaries into every provider call. They are drawn from
  a fixed pool, so they recur across calls: a row whose input angles appear in another
  entry of the log is a canary (or someone else's repeated image) and is dropped;
- at the first provider the inputs are the image's features in the clear: the row whose
  inputs equal the query's features (to 1e-6) is its own, whatever the timing.
A query is attributed when exactly one candidate row is left; the others are counted as
not found (the insider strategy then uses them for distillation only). Cross-client
batching with row shuffling (a defence) is what breaks this.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from qumos.attack.context import QueryRows
from qumos.attack.driver import Oracle
from qumos.errors import AttackError


class HttpOracle(Oracle):
    """`answer` sends each image as its own predict request to the public API;
    `rows(j, ...)` attributes them in provider j's log (`provider_dirs[j]`)."""

    def __init__(self, url: str, model: str, provider_dirs: dict[int, Path] | None = None,
                 api_key: str | None = None, timeout: float = 60.0, per_request: int = 1):
        self.url, self.model = url.rstrip("/"), model
        self.provider_dirs = {int(k): Path(v) for k, v in (provider_dirs or {}).items()}
        self.api_key, self.timeout, self.per_request = api_key, timeout, per_request
        self.windows: list[tuple[float, float]] = []  # per query: (sent, answered)
        self.sent: np.ndarray | None = None

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def answer(self, raw: np.ndarray) -> np.ndarray:
        from qumos.client import make_client, predict

        raw = np.asarray(raw, dtype=float)
        out, windows = [], []
        with make_client(timeout=self.timeout) as client:
            client.headers.update(self._headers())
            for i in range(0, len(raw), self.per_request):
                part = raw[i:i + self.per_request]
                t0 = time.time()
                resp = predict(client, self.url, self.model, part)
                t1 = time.time()
                out.append(np.asarray(resp.probabilities, dtype=float))
                windows += [(t0, t1)] * len(part)
        self.windows, self.sent = windows, raw
        return np.concatenate(out) if out else np.zeros((0, 0))

    def rows(self, j: int, raw: np.ndarray, features: np.ndarray) -> QueryRows:
        from qumos.attack.holdings import breach

        if j not in self.provider_dirs:
            raise AttackError(f"provider: no data directory of fragment {j}'s provider; the "
                              f"insider reads its own rows there (have {sorted(self.provider_dirs)})")
        if self.sent is None or len(self.sent) != len(raw):
            raise AttackError("queries: rows() before answer() for the same queries")
        h = breach(self.provider_dirs[j])
        return attribute(h.access_log, f"{self.model}.{j}", self.windows, features,
                         position0=(j == 0))


def attribute(log: list[dict], fragment_id: str, windows: list[tuple[float, float]],
              features: np.ndarray, position0: bool, slack: float = 0.0) -> QueryRows:
    """The insider's rows for its queries (module docstring). The provider logs a call
    after executing it, on the same clock: a query's entries lie inside its window
    (`slack` widens it for clocks that differ)."""
    entries = []
    for e in log:
        if e.get("fragment_id") != fragment_id:
            continue
        try:
            a = np.asarray(e["inputs"], dtype=float)
            b = np.asarray(e["outputs"], dtype=float)
            t = float(e["time"])
        except (KeyError, TypeError, ValueError):
            continue
        if a.ndim == 2 and b.ndim == 2 and len(a) == len(b):
            entries.append((t, a, b))
    n = len(windows)
    if not entries:
        return QueryRows(np.zeros((n, 0)), np.zeros((n, 0)), np.zeros(n, dtype=bool))
    n_in, n_out = entries[0][1].shape[1], entries[0][2].shape[1]
    counts: dict[bytes, int] = {}
    keys = []
    for _, a, _b in entries:
        ks = [np.round(r, 6).tobytes() for r in a]
        keys.append(ks)
        for k in set(ks):
            counts[k] = counts.get(k, 0) + 1
    times = np.asarray([t for t, _, _ in entries])
    ins, outs = np.zeros((n, n_in)), np.zeros((n, n_out))
    found = np.zeros(n, dtype=bool)
    for i, (t0, t1) in enumerate(windows):
        cand = np.flatnonzero((times >= t0 - slack) & (times <= t1 + slack))
        rows = []
        for c in cand:
            _, a, b = entries[c]
            for r in range(len(a)):
                if position0:
                    if np.allclose(a[r], features[i], atol=1e-6):
                        rows.append((a[r], b[r]))
                elif counts[keys[c][r]] == 1:
                    rows.append((a[r], b[r]))
        if len(rows) == 1:
            ins[i], outs[i] = rows[0]
            found[i] = True
    return QueryRows(ins, outs, found)
