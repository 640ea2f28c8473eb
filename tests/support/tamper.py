"""A breached provider that lies: an httpx transport in front of a real provider app that
adds `delta` to every output of a random `fraction` of the rows it answers (staying in
[-1, 1], so the answer is well-formed and plausible). Used by the integrity tests and by
bench/bench_tamper.py."""

from __future__ import annotations

import json

import httpx
import numpy as np


class TamperingTransport(httpx.AsyncBaseTransport):
    def __init__(self, app, delta: float, fraction: float, seed: int = 0):
        self.inner = httpx.ASGITransport(app=app)
        self.delta, self.fraction = delta, fraction
        self.rng = np.random.default_rng(seed)
        self.rows_seen = 0
        self.rows_tampered = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/execute"):
            return resp
        body = json.loads(await resp.aread())
        if resp.status_code != 200:
            return httpx.Response(resp.status_code, json=body)
        out = np.asarray(body["outputs"])
        hit = self.rng.random(len(out)) < self.fraction
        shifted = out + self.delta
        out = np.where(hit[:, None], np.where(shifted <= 1, shifted, out - self.delta), out)
        self.rows_seen += len(out)
        self.rows_tampered += int(hit.sum())
        return httpx.Response(200, json=body | {"outputs": out.tolist()})
