"""A canary never duplicates a row of the call it joins (an insider would take the
repeated row for its own query)."""

from __future__ import annotations

import asyncio

import numpy as np
from qumos.spec import build_spec, design_from_flags

from services.orchestrator.canaries import Integrity


class _Canaries:
    def __init__(self, inputs: np.ndarray):
        self.inputs = [inputs]
        self.outputs = [np.zeros((len(inputs), 4))]

    def allowed(self, expected, shots):
        return 1e-6


def test_no_canary_equals_a_row_of_its_call():
    spec = build_spec(design_from_flags(fragments="1"), name="m")
    pool = np.arange(40, dtype=float).reshape(10, 4) / 40
    sent = []

    async def execute(spec, k, batch, shots, seed):
        sent.append(batch.copy())
        return np.zeros((len(batch), 4))

    rows = pool[[2, 5, 7]]  # the user's rows are three of the canaries
    integrity = Integrity(b"k" * 32, per_call=8, max_batch=64)
    for _ in range(20):
        out = asyncio.run(integrity.run(execute, spec, 0, rows, None, None, _Canaries(pool)))
        assert out.shape == (3, 4)
        batch = sent[-1]
        assert len(batch) == 3 + 7  # the other 7 canaries, none of the three
        assert len(np.unique(batch, axis=0)) == len(batch)  # no row twice in the call
