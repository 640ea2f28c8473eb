"""A small synchronous client of the services: `make_client` (httpx on the lean
transport), `predict`, `create_key`, `wait_ready`, and `check_response`, which turns an
error answer into `qumos.errors.ServiceError`. The request and response models are in
`qumos.wire`; deploying a model (the company side) is `qumos.deploy`. Any `httpx.Client`
works with these functions; `make_client()` is what the CLI, the demo and the
benchmarks use.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from qumos.errors import ServiceError, StackError
from qumos.wire import PredictResponse, dump_json

if TYPE_CHECKING:
    from collections.abc import Callable

    import httpx


def check_response(resp: httpx.Response) -> Any:
    """The decoded JSON body (or the text) of `resp`; ServiceError on a 4xx/5xx status."""
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    if resp.status_code >= 400:
        raise ServiceError.from_response(resp.status_code, body, str(resp.request.url))
    return body


def make_client(timeout: float = 30.0, transport: str | None = None,
                **kwargs) -> httpx.Client:
    """An `httpx.Client` on the lean HTTP/1.1 transport (`qumos.http11.SyncTransport`):
    the same API, ~0.1-0.5 ms less per exchange than httpx's default transport
    (`bench/bench_http_floor.py`, docs/performance.md). `transport="httpcore"` (or the
    environment's QUMOS_HTTP_TRANSPORT=httpcore) gives httpx's own transport instead.
    Any `httpx.Client` works with the functions here; this one is what the CLI, the demo
    and the benchmarks use."""
    import httpx

    kind = transport or os.environ.get("QUMOS_HTTP_TRANSPORT", "qumos")
    if kind == "httpcore":
        return httpx.Client(timeout=timeout, **kwargs)
    if kind != "qumos":
        raise ValueError(f"transport: {kind!r}; allowed: 'qumos', 'httpcore'")
    from qumos.http11 import SyncTransport

    return httpx.Client(transport=SyncTransport(), timeout=timeout, **kwargs)


def create_key(orchestrator_url: str, admin_token: str, name: str, timeout: float = 30.0,
               **quota) -> dict:
    """POST /v1/keys (admin): {"key": ..., "id": ..., ...}; the key is shown only here."""
    with make_client(timeout=timeout) as client:
        return check_response(client.post(
            f"{orchestrator_url.rstrip('/')}/v1/keys", json={"name": name, **quota},
            headers={"Authorization": f"Bearer {admin_token}"}))


def predict(client, orchestrator_url: str, model: str, instances, shots: int | None = None,
            seed: int | None = None, api_key: str | None = None) -> PredictResponse:
    """One predict call with an `httpx.Client`; raises ServiceError on an error status, and
    ValueError (naming the position) before sending instances that are ragged, not numbers,
    NaN or infinite. The body is encoded with orjson straight from a numpy array."""
    import numpy as np

    try:
        x = np.ascontiguousarray(instances, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"instances: not a (batch, features) array of numbers ({e})") from None
    if x.ndim != 2:
        raise ValueError(f"instances: shape {x.shape}; expected (batch, features)")
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):  # JSON has no NaN or infinity; the service would refuse them too
        i, j = bad[0]
        raise ValueError(f"instances[{i}][{j}]: is {x[i, j]}; every value must be a finite "
                         "number")
    body: dict[str, Any] = {"instances": x}
    if shots is not None:
        body["shots"] = shots
    if seed is not None:
        body["seed"] = seed
    headers = {"Content-Type": "application/json"}
    if api_key:  # else the client's own Authorization header (if any) goes
        headers["Authorization"] = f"Bearer {api_key}"
    resp = client.post(f"{orchestrator_url.rstrip('/')}/v1/models/{model}/predict",
                       content=dump_json(body), headers=headers)
    if resp.status_code >= 400:
        check_response(resp)
    return PredictResponse.model_validate_json(resp.content)


def wait_ready(urls: dict[str, str], timeout: float, check: Callable[[str], None] | None = None,
               poll: float = 0.2, detail: Callable[[list[str]], str] | None = None
               ) -> dict[str, float]:
    """Poll every service's /readyz until all answer 200; the seconds each took.
    `check(name)` runs before each probe (e.g. raises when the service's process exited);
    after `timeout`, StackError naming the services still waiting, their last answer, and
    `detail(waiting)` (e.g. a log tail)."""
    import httpx

    t0 = time.perf_counter()
    waiting, took, last = dict(urls), {}, {}
    with httpx.Client(timeout=min(5.0, timeout)) as client:
        while waiting:
            for name, url in list(waiting.items()):
                if check is not None:
                    check(name)
                try:
                    r = client.get(f"{url.rstrip('/')}/readyz")
                    if r.status_code == 200:
                        took[name] = time.perf_counter() - t0
                        del waiting[name]
                        continue
                    last[name] = f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    last[name] = f"{type(e).__name__}: {e}"
            if waiting and time.perf_counter() - t0 > timeout:
                raise StackError(f"not ready after {timeout:.0f}s: " + "; ".join(
                    f"{n} ({last.get(n, 'no answer')})" for n in waiting)
                    + (detail(list(waiting)) if detail else ""))
            if waiting:
                time.sleep(poll)
    return took
