"""Bounded load test on loopback: the `qumos up` stack (three providers + orchestrator as
uvicorn processes, canaries on) under C concurrent clients for D seconds.

Phase 1 (steady): --clients below the orchestrator's in-flight limit; every answer is
checked against the in-process torch model. Expected: zero errors, zero wrong answers.
Phase 2 (overload): --overload-clients above the limit; the excess must be pushed back
with 503 + Retry-After, every 200 must still be right.

    python bench/bench_load.py                                 # 8 clients x 15 s, quick
    python bench/bench_load.py --clients 50 --duration 60 --max-inflight 64 \
        --overload-clients 96 --json-out results/reliability/load.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def phase(stack, raw, ref, clients: int, duration: float, batch: int, seed: int) -> dict:
    url = f"{stack.orchestrator_url}/v1/models/{stack.model}/predict"
    lat, codes, wrong, retry_after_missing = [], collections.Counter(), [0], [0]
    lock = threading.Lock()
    end = time.monotonic() + duration

    def client(i):
        rng = np.random.default_rng(seed + i)
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < end:
                idx = rng.choice(len(raw), size=batch, replace=False)
                t0 = time.perf_counter()
                try:
                    r = c.post(url, json={"instances": raw[idx].tolist()})
                    code = r.status_code
                except httpx.TransportError:
                    code = -1
                dt = time.perf_counter() - t0
                with lock:
                    codes[code] += 1
                    if code == 200:
                        lat.append(dt)
                        if not np.allclose(r.json()["probabilities"], ref[idx], atol=1e-4):
                            wrong[0] += 1
                    elif code in (429, 503) and "retry-after" not in r.headers:
                        retry_after_missing[0] += 1
                if code in (429, 503):
                    time.sleep(float(r.headers.get("retry-after", "1")) * 0.1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 120)
    wall = time.monotonic() - t0
    n = sum(codes.values())
    lat_ms = np.array(lat) * 1000
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": n,
        "ok": codes[200],
        "pushed_back": codes[503] + codes[429],
        "errors": n - codes[200] - codes[503] - codes[429],
        "wrong_answers": wrong[0],
        "retry_after_missing": retry_after_missing[0],
        "status": {str(k): v for k, v in sorted(codes.items())},
        "rps": round(codes[200] / wall, 1),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 1) if lat else None,
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 1) if lat else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    ap.add_argument("--batch", type=int, default=4, help="images per request")
    ap.add_argument(
        "--max-inflight",
        type=int,
        default=16,
        help="orchestrator and provider in-flight limit (QUMOS_*_MAX_INFLIGHT)",
    )
    ap.add_argument("--overload-clients", type=int, default=48, help="0: skip phase 2")
    ap.add_argument("--artifact", default=None, help="artifact dir (default: train a tiny one)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if args.clients >= args.max_inflight:
        ap.error("--clients must stay below --max-inflight for the zero-error phase")

    import torch
    from bench_tamper import small_artifact
    from qumos.datasets import load_task
    from qumos.localstack import stack_on_free_ports
    from qumos.model import DistributedQNN

    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    art = small_artifact(Path(args.artifact) if args.artifact else tmp / "model")
    test = load_task(art.spec.dataset, art.spec.task, seed=0).test
    with torch.no_grad():
        ref = torch.softmax(
            DistributedQNN(art.spec, dtype=torch.float64)(
                torch.as_tensor(test.x, dtype=torch.float64)
            ),
            1,
        ).numpy()
    lim = str(args.max_inflight)
    stack = stack_on_free_ports(
        tmp / "stack",
        with_attacker=False,
        orchestrator_env={"QUMOS_ORCH_MAX_INFLIGHT": lim},
        provider_env={
            n: {"QUMOS_PROVIDER_MAX_INFLIGHT": lim}
            for n in ("provider-a", "provider-b", "provider-c")
        },
    )
    stack.model = art.spec.name
    out = {}
    with stack:
        stack.deploy(art)
        out["steady"] = phase(stack, test.raw, ref, args.clients, args.duration, args.batch, 0)
        print(json.dumps(out["steady"]), flush=True)
        if args.overload_clients:
            out["overload"] = phase(
                stack, test.raw, ref, args.overload_clients, args.duration, args.batch, 1000
            )
            print(json.dumps(out["overload"]), flush=True)
    print(
        "\n| phase | clients | requests | ok | 503 pushed back | other errors | wrong | "
        "p50 ms | p99 ms | ok/s |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for name, r in out.items():
        print(
            f"| {name} | {r['clients']} | {r['requests']} | {r['ok']} | {r['pushed_back']} "
            f"| {r['errors']} | {r['wrong_answers']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['rps']} |"
        )
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out | {"args": vars(args)}, indent=1))
    bad = (
        out["steady"]["errors"]
        + out["steady"]["pushed_back"]
        + sum(r["wrong_answers"] + r["errors"] + r["retry_after_missing"] for r in out.values())
    )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
