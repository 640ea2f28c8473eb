"""The three-provider HTTP chain vs. the same three fragments back to back on Aer in one
process, measured side by side (interleaved rounds) in one run.

    python bench/bench_chain.py [--artifact artifacts/default] [--rounds 5] [--max-seconds 240]

For batch 1, 32 and 256: throughput (samples/s) of in-process Aer, of the HTTP chain with
one client, and of the HTTP chain with 3 concurrent clients (the providers then work in
parallel, as a pipeline); latency p50/p99 at batch 1. Prints a markdown table with the
ratios HTTP / in-process. Targets: >= 0.8 of in-process throughput at batch 256, <= 1.3x
in-process latency at batch 1. Bounded: a fixed number of calls per cell and a time limit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from qumos.artifact import load_artifact
from qumos.chain import preprocess, run_chain
from qumos.client import predict
from qumos.datasets import load_task
from qumos.localstack import stack_on_free_ports
from qumos.quantum import AerRunner

CALLS = {1: 40, 32: 12, 256: 4}  # calls per round per cell


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/default"))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    args = ap.parse_args()
    t_start = time.perf_counter()
    art = load_artifact(args.artifact)
    spec = art.spec
    raw = load_task(spec.dataset, spec.task, seed=0).train.raw
    runners = [AerRunner(f) for f in spec.fragments]

    def in_process(x):
        return run_chain(spec, preprocess(x, spec.preprocess), lambda k, a: runners[k].run(a))

    samples = {b: {"local": [], "http": []} for b in CALLS}
    conc = {b: [] for b in CALLS}
    with tempfile.TemporaryDirectory() as tmp:
        stack = stack_on_free_ports(tmp, with_attacker=False)
        with stack:
            stack.deploy(art)
            url = stack.orchestrator_url
            with httpx.Client(timeout=120) as client:
                # warm up both paths; check they agree
                a = in_process(raw[:8])
                b = np.array(predict(client, url, spec.name, raw[:8]).probabilities)
                assert np.abs(a - b).max() < 1e-6, np.abs(a - b).max()
                rng = np.random.default_rng(0)
                for r in range(args.rounds):
                    for bsz, n in CALLS.items():
                        for _ in range(n):
                            x = raw[rng.choice(len(raw), bsz, replace=False)]
                            t0 = time.perf_counter()
                            in_process(x)
                            samples[bsz]["local"].append(time.perf_counter() - t0)
                            t0 = time.perf_counter()
                            predict(client, url, spec.name, x)
                            samples[bsz]["http"].append(time.perf_counter() - t0)
                        # 3 concurrent clients, n calls each
                        xs = [raw[rng.choice(len(raw), bsz, replace=False)]
                              for _ in range(3 * n)]
                        with ThreadPoolExecutor(3) as pool, httpx.Client(timeout=120) as c2:
                            t0 = time.perf_counter()
                            list(pool.map(lambda x: predict(c2, url, spec.name, x), xs))
                            conc[bsz].append((3 * n * bsz, time.perf_counter() - t0))
                    if time.perf_counter() - t_start > args.max_seconds:
                        print(f"time limit reached after {r + 1} rounds", file=sys.stderr)
                        break

    rows = ["| batch | in-process Aer (samples/s) | HTTP chain (samples/s) | ratio | "
            "HTTP, 3 clients (samples/s) | ratio |", "|---|---|---|---|---|---|"]
    for bsz in CALLS:
        loc = bsz * len(samples[bsz]["local"]) / sum(samples[bsz]["local"])
        htp = bsz * len(samples[bsz]["http"]) / sum(samples[bsz]["http"])
        cc = sum(s for s, _ in conc[bsz]) / sum(t for _, t in conc[bsz])
        rows.append(f"| {bsz} | {loc:.0f} | {htp:.0f} | {htp / loc:.2f} | {cc:.0f} | "
                    f"{cc / loc:.2f} |")
    l1 = np.array(samples[1]["local"]) * 1000
    h1 = np.array(samples[1]["http"]) * 1000
    rows += ["", "| latency at batch 1 | in-process (ms) | HTTP chain (ms) | ratio |",
             "|---|---|---|---|"]
    for q in (50, 99):
        a, b = np.percentile(l1, q), np.percentile(h1, q)
        rows.append(f"| p{q} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    print("\n".join(rows))
    print(f"\n{len(samples[1]['local'])} batch-1 calls per path; model {spec.name} "
          f"({'-'.join(str(f.depth) for f in spec.fragments)} {spec.fragments[0].block}); "
          f"{time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
