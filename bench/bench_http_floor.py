"""What one HTTP exchange costs on this machine, whatever the service does: the floor under
the batch-1 latency of the provider chain (bench/bench_chain.py), which makes four
sequential exchanges per prediction (client -> orchestrator, orchestrator -> 3 providers).

    python bench/bench_http_floor.py [--requests 1500]

Two uvicorn processes on loopback answer the same POST (an execute-sized body: one row of
16 angles, an answer of 4 values) with a fixed answer and no work:
- `fastapi`: the route served the way the services serve execute and predict (a FastAPI
  route, the bearer check as a dependency, behind the services' own stack from
  `install_common`: metrics, body limit, in-flight limit, JSON errors);
- `raw ASGI`: a bare ASGI callable that reads the body and answers: the least a Python
  HTTP server under uvicorn can do.
Two clients send to both, all four combinations alternating request by request so all see
the same machine state: `httpx.Client()` with httpx's own transport (httpcore + h11), and
`qumos.client.make_client()` (httpx on `qumos.http11.SyncTransport`). Prints p50/p99 per
exchange and the ratios. Bounded: --requests per combination, after 200 warm-up requests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import httpx
import numpy as np
from fastapi import Depends, FastAPI, Request, Response
from qumos.client import make_client
from qumos.localstack import HOST, free_port
from qumos.web import bearer, install_common

TOKEN = "bench-token"
ANSWER = b'{"outputs": [[0.1, 0.2, 0.3, 0.4]]}'


def fastapi_app() -> FastAPI:
    app = FastAPI()
    install_common(app, 8 * 1024 * 1024, max_inflight=64)

    @app.post("/v1/fragments/{fragment_id}/execute", dependencies=[Depends(bearer(lambda: TOKEN))])
    async def execute(fragment_id: str, request: Request):
        await request.body()
        return Response(ANSWER, media_type="application/json")

    return app


async def raw_app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": ANSWER})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1500, help="timed requests per server")
    args = ap.parse_args()
    servers = {
        "fastapi": ("--factory", "bench_http_floor:fastapi_app"),
        "raw ASGI": ("bench_http_floor:raw_app",),
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))
        + os.pathsep
        + os.environ.get("PYTHONPATH", ""),
    }
    ports, procs = {}, []
    try:
        for name, app in servers.items():
            ports[name] = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        *app,
                        "--host",
                        HOST,
                        "--port",
                        str(ports[name]),
                        "--log-level",
                        "warning",
                        "--no-access-log",
                        "--no-proxy-headers",
                    ],
                    env=env,
                    stdin=subprocess.DEVNULL,
                )
            )
        body = (
            '{"inputs": [[' + ",".join(f"{v:.3f}" for v in np.linspace(0, 3, 16)) + "]]}"
        ).encode()
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        clients = {"httpx default": httpx.Client(timeout=10), "make_client": make_client(10)}
        times = {(s, c): [] for s in servers for c in clients}
        deadline = time.monotonic() + 60
        for name, port in ports.items():  # wait until both answer
            while True:
                try:
                    clients["httpx default"].post(
                        f"http://{HOST}:{port}/v1/fragments/a.0/execute",
                        content=body,
                        headers=headers,
                    ).raise_for_status()
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{name} server did not start") from None
                    time.sleep(0.2)
        for i in range(200 + args.requests):
            for (name, cname), ts in times.items():
                t0 = time.perf_counter()
                clients[cname].post(
                    f"http://{HOST}:{ports[name]}/v1/fragments/a.0/execute",
                    content=body,
                    headers=headers,
                ).raise_for_status()
                if i >= 200:
                    ts.append(time.perf_counter() - t0)
        for c in clients.values():
            c.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    ms = {k: np.array(t) * 1e3 for k, t in times.items()}
    base = ms[("fastapi", "httpx default")]
    print("| one HTTP exchange | client | p50 (ms) | p99 (ms) | p50 / fastapi + httpx default |")
    print("|---|---|---|---|---|")
    for (name, cname), v in ms.items():
        print(
            f"| {name} | {cname} | {np.percentile(v, 50):.3f} | {np.percentile(v, 99):.3f} "
            f"| {np.percentile(v, 50) / np.percentile(base, 50):.2f} |"
        )
    print(
        f"\n{args.requests} requests per combination, interleaved; mean "
        + ", ".join(f"{n}/{c} {statistics.mean(v):.3f}" for (n, c), v in ms.items())
        + f" ms; loadavg {os.getloadavg()[0]:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
