"""The three-provider HTTP chain vs. the same three fragments back to back on Aer in one
process, measured side by side (interleaved rounds) in one run.

    python bench/bench_chain.py [--artifact artifacts/default] [--rounds 5] [--max-seconds 240]
                                [--variants default,no-canaries,httpcore]

For batch 1, 32 and 256: throughput (samples/s) of in-process Aer, of the HTTP chain with
one client, and of the HTTP chain with 3 concurrent clients (the providers then work in
parallel, as a pipeline); latency p50/p99 at batch 1. Each orchestrator variant (default:
4 integrity canaries per provider call; no-canaries: the chain alone, as the issue's
target defines it; 1-canary; httpcore: httpx's own transport instead of qumos.http11) is its own
stack, measured in the same interleaved rounds. Clients are `qumos.client.make_client()`
(httpx on qumos.http11). Prints a markdown table with the ratios HTTP / in-process.
Targets: >= 0.8 of in-process throughput at batch 256, <= 1.3x in-process latency at
batch 1. Bounded: a fixed number of calls per cell and a time limit.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from qumos.artifact import load_artifact
from qumos.chain import preprocess, run_chain
from qumos.client import make_client, predict
from qumos.datasets import load_task
from qumos.localstack import stack_on_free_ports
from qumos.quantum import AerRunner

CALLS = {1: 40, 32: 12, 256: 4}  # calls per round per cell


# Orchestrator configurations measured side by side (each its own stack of 4 processes).
VARIANTS = {
    "default": {},  # 4 integrity canaries per provider call, qumos.http11 transport
    "no-canaries": {"QUMOS_ORCH_CANARIES_PER_CALL": "0"},
    "1-canary": {"QUMOS_ORCH_CANARIES_PER_CALL": "1"},
    "httpcore": {"QUMOS_ORCH_HTTP_TRANSPORT": "httpcore"},  # httpx's own transport
}
PROVIDER_VARIANTS: dict[str, dict[str, str]] = {}  # {variant: the providers' settings}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/default"))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument(
        "--variants",
        default="default,no-canaries",
        help=f"orchestrator settings to compare, from {','.join(VARIANTS)}",
    )
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: unknown {v!r}; allowed: {', '.join(VARIANTS)}")
    t_start = time.perf_counter()
    art = load_artifact(args.artifact)
    spec = art.spec
    raw = load_task(spec.dataset, spec.task, seed=0).train.raw
    runners = [AerRunner(f) for f in spec.fragments]

    def in_process(x):
        return run_chain(spec, preprocess(x, spec.preprocess), lambda k, a: runners[k].run(a))

    paths = ["local", *variants]
    samples = {b: {p: [] for p in paths} for b in CALLS}
    conc = {b: [] for b in CALLS}  # 3 concurrent clients, first variant
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stacks:
        urls, keys = {}, {}  # predict needs a client API key (the stack makes one)
        for v in variants:
            penv = PROVIDER_VARIANTS.get(v, {})
            stack = stacks.enter_context(
                stack_on_free_ports(
                    Path(tmp) / v,
                    with_attacker=False,
                    orchestrator_env=VARIANTS[v],
                    provider_env={p: penv for p in spec.placement},
                )
            )
            stack.deploy(art)
            urls[v], keys[v] = stack.orchestrator_url, stack.client_key
        with make_client(timeout=120) as client:
            calls = {"local": in_process}
            for v, url in urls.items():
                calls[v] = lambda x, url=url, key=keys[v]: predict(
                    client, url, spec.name, x, api_key=key
                )
            # warm up every path; check they agree
            a = in_process(raw[:8])
            for v in variants:
                b = np.array(calls[v](raw[:8]).probabilities)
                assert np.abs(a - b).max() < 1e-6, (v, np.abs(a - b).max())
            # The services freeze their start-up heap (qumos.web's freeze_startup_heap); so
            # does this process, which runs the in-process side and the clients: a full
            # garbage collection over qiskit's objects would otherwise land in some cell.
            gc.collect()
            gc.freeze()
            rng = np.random.default_rng(0)
            for r in range(args.rounds):
                for bsz, n in CALLS.items():
                    for _ in range(n):
                        x = raw[rng.choice(len(raw), bsz, replace=False)]
                        for p in paths:
                            t0 = time.perf_counter()
                            calls[p](x)
                            samples[bsz][p].append(time.perf_counter() - t0)
                    xs = [raw[rng.choice(len(raw), bsz, replace=False)] for _ in range(3 * n)]
                    url, key = urls[variants[0]], keys[variants[0]]
                    with ThreadPoolExecutor(3) as pool, make_client(timeout=120) as c2:
                        t0 = time.perf_counter()
                        list(
                            pool.map(
                                lambda x, u=url, k=key: predict(c2, u, spec.name, x, api_key=k), xs
                            )
                        )
                        conc[bsz].append((3 * n * bsz, time.perf_counter() - t0))
                if time.perf_counter() - t_start > args.max_seconds:
                    print(f"time limit reached after {r + 1} rounds", file=sys.stderr)
                    break

    def rate(bsz, p):
        return bsz * len(samples[bsz][p]) / sum(samples[bsz][p])

    head = " | ".join(f"HTTP {v} (samples/s) | ratio" for v in variants)
    rows = [
        f"| batch | in-process Aer (samples/s) | {head} | HTTP {variants[0]}, 3 clients "
        "(samples/s) | ratio |",
        "|---" * (4 + 2 * len(variants)) + "|",
    ]
    for bsz in CALLS:
        loc = rate(bsz, "local")
        cells = " | ".join(f"{rate(bsz, v):.0f} | {rate(bsz, v) / loc:.2f}" for v in variants)
        cc = sum(s for s, _ in conc[bsz]) / sum(t for _, t in conc[bsz])
        rows.append(f"| {bsz} | {loc:.0f} | {cells} | {cc:.0f} | {cc / loc:.2f} |")
    ms = {p: np.array(samples[1][p]) * 1000 for p in paths}
    head = " | ".join(f"HTTP {v} (ms) | ratio" for v in variants)
    rows += [
        "",
        f"| latency at batch 1 | in-process (ms) | {head} |",
        "|---" * (2 + 2 * len(variants)) + "|",
    ]
    for q in (50, 99):
        a = np.percentile(ms["local"], q)
        cells = " | ".join(
            f"{np.percentile(ms[v], q):.1f} | {np.percentile(ms[v], q) / a:.2f}" for v in variants
        )
        rows.append(f"| p{q} | {a:.1f} | {cells} |")
    print("\n".join(rows))
    print(
        f"\n{len(samples[1]['local'])} batch-1 calls per path; model {spec.name} "
        f"({'-'.join(str(f.depth) for f in spec.fragments)} {spec.fragments[0].block}); "
        f"variants: "
        + "; ".join(
            f"{v} = {({**VARIANTS[v], **PROVIDER_VARIANTS.get(v, {})}) or 'defaults'}"
            for v in variants
        )
        + f"; loadavg {os.getloadavg()[0]:.1f}; {time.perf_counter() - t_start:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
