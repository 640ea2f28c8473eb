"""The attacker against running services: queries through the public API, its own rows
attributed in the breached provider's real `access.jsonl`.

How a real insider attributes its rows (what `HttpOracle.rows` does):
- it sends its queries one image per request and notes when each request left and when
  its answer came back; the provider writes each executed call to its log with the time,
  so the candidate entries of query i are those of the fragment logged inside its window;
- at the first provider the inputs are the image's features in the clear: the row whose
  inputs equal the query's features (to 1e-6) is its own, whatever the timing;
- at a later provider the orchestrator's integrity canaries (drawn from a fixed pool,
  without repetition within a call) share the call with the query's row. By default
  (`repeat=2`) the insider sends its image twice in the request: its rows are then the
  only ones that appear twice within the call. This costs two images per query on the
  public API (`images_sent`). With `repeat=1` it relies on the canaries recurring across
  calls: a row whose input angles appear in another entry of the log is dropped.
A query is attributed when exactly one candidate row is left; the others are counted as
not found (the insider strategy then uses them for distillation only). The canaries are
the company's own training images, so a query that happens to be one of them recurs like
a canary; if that call's other canaries all recurred but one, that lone canary is taken
for the query's row (measured: a few per cent of the attributed rows at a later
provider, tests/integration/test_attack_live.py). Cross-client
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

    def __init__(
        self,
        url: str,
        model: str,
        provider_dirs: dict[int, Path] | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        repeat: int = 2,
        hidden_inputs: bool = False,
    ):
        if repeat not in (1, 2):
            raise AttackError(f"repeat: {repeat}; allowed: 1 or 2")
        self.url, self.model = url.rstrip("/"), model
        self.provider_dirs = {int(k): Path(v) for k, v in (provider_dirs or {}).items()}
        self.api_key, self.timeout, self.repeat = api_key, timeout, repeat
        # input hiding: position-0 rows are transformed angles, matched like later ones
        self.hidden_inputs = hidden_inputs
        self.windows: list[tuple[float, float]] = []  # per query: (sent, answered)
        self.sent: np.ndarray | None = None
        self.images_sent = 0  # images on the public API (queries x repeat)

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def answer(self, raw: np.ndarray) -> np.ndarray:
        from qumos.client import make_client, predict

        raw = np.asarray(raw, dtype=float)
        out, windows = [], []
        with make_client(timeout=self.timeout) as client:
            client.headers.update(self._headers())
            for i in range(len(raw)):
                t0 = time.time()
                resp = predict(
                    client, self.url, self.model, np.repeat(raw[i : i + 1], self.repeat, axis=0)
                )
                t1 = time.time()
                if resp.probabilities is None:  # a label-only output policy
                    out.append(np.asarray(resp.predictions[:1]))
                else:
                    out.append(np.asarray(resp.probabilities, dtype=float)[:1])
                windows.append((t0, t1))
                self.images_sent += self.repeat
        self.windows, self.sent = windows, raw
        return np.concatenate(out) if out else np.zeros((0, 0))

    def rows(self, j: int, raw: np.ndarray, features: np.ndarray) -> QueryRows:
        from qumos.attack.holdings import breach

        if j not in self.provider_dirs:
            raise AttackError(
                f"provider: no data directory of fragment {j}'s provider; the "
                f"insider reads its own rows there (have {sorted(self.provider_dirs)})"
            )
        if self.sent is None or len(self.sent) != len(raw):
            raise AttackError("queries: rows() before answer() for the same queries")
        h = breach(self.provider_dirs[j])
        return attribute(
            h.access_log,
            f"{self.model}.{j}",
            self.windows,
            features,
            position0=(j == 0 and not self.hidden_inputs),
            repeat=self.repeat,
        )


def attribute(
    log: list[dict],
    fragment_id: str,
    windows: list[tuple[float, float]],
    features: np.ndarray,
    position0: bool,
    slack: float = 0.0,
    repeat: int = 1,
) -> QueryRows:
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
        rows: dict[bytes, tuple] = {}
        for c in cand:
            _, a, b = entries[c]
            within = {k: keys[c].count(k) for k in set(keys[c])}
            for r in range(len(a)):
                k = keys[c][r]
                if position0:
                    ok = np.allclose(a[r], features[i], atol=1e-6)
                elif repeat > 1:
                    ok = within[k] >= repeat  # the query's copies; canaries never repeat
                else:
                    ok = counts[k] == 1  # seen in no other call: not a pooled canary
                if ok:
                    rows[k] = (a[r], b[r])
        if len(rows) == 1:
            ins[i], outs[i] = next(iter(rows.values()))
            found[i] = True
    return QueryRows(ins, outs, found)
