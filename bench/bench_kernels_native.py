"""The C kernels built for this CPU (-march=native) against the portable build, side by side.

    python bench/bench_kernels_native.py [--reps 3] [--steps 40]

One forward + backward training step of one fragment, many models at once (72, the
attacker's restarts x seeds), at the attacker's batch (22 rows per model) and with its
access log (222), for the reference fragments of bench/bench_evaluate.py. Each build runs
in its own fresh process (QUMOS_KERNEL_NATIVE=1 / 0), alternating, on one core; the table
gives the best time per step of each and the ratio. Both builds' outputs are compared too
(the largest difference of the step's outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = (
    ("u3cu3:2-2-2", 1),
    ("rzz_ry:4-u3cu3:2R-rxyz_cnot:5R", 0),
    ("rzz_ry:4-u3cu3:2R-rxyz_cnot:5R", 2),
    ("rxyz_cnot:2-2-2", 1),
)
BATCHES = (22, 222)
MODELS = 72


def child(steps: int) -> None:
    """Time every case in this process; print JSON {case: [ms, checksum]}."""
    import time

    import torch

    sys.path.insert(0, str(ROOT / "shared"))
    from qumos import kernels
    from qumos.spec import build_spec, parse_short_design
    from qumos.torchsim import FragmentSim

    torch.set_num_threads(1)
    kernels.set_mode("c")  # a build that cannot load is an error here, not a fallback
    out = {}
    for short, k in CASES:
        frag = build_spec(parse_short_design(short)).fragments[k]
        sim = FragmentSim(frag)
        for batch in BATCHES:
            g = torch.Generator().manual_seed(0)
            w = (torch.rand(MODELS, frag.n_params, generator=g) * 6 - 3).requires_grad_()
            x = (torch.rand(MODELS, batch, frag.n_inputs, generator=g) * 6 - 3).requires_grad_()

            def step(sim=sim, x=x, w=w):
                y = sim(x, w)
                y.sum().backward()
                return y

            for _ in range(5):
                y = step()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            ms = (time.perf_counter() - t0) / steps * 1e3
            out[f"{short}#{k}@{batch}"] = [ms, y.detach().double().flatten()[:64].tolist()]
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per build (>= 1)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per case (>= 1)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reps < 1 or args.steps < 1:
        ap.error("--reps and --steps: allowed >= 1")
    if args.child:
        child(args.steps)
        return
    load = os.getloadavg()
    best: dict[str, dict[str, float]] = {"native": {}, "portable": {}}
    outs: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.reps):
        for name, flag in (("native", "1"), ("portable", "0")):
            env = {**os.environ, "QUMOS_KERNEL_NATIVE": flag, "OMP_NUM_THREADS": "1"}
            res = subprocess.run(
                [sys.executable, __file__, "--child", "--steps", str(args.steps)],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            data = json.loads(res.stdout.strip().splitlines()[-1])
            for case, (ms, ys) in data.items():
                best[name][case] = min(ms, best[name].get(case, float("inf")))
                outs.setdefault(name, {})[case] = ys
    print(f"load average {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"{MODELS} models, best of {args.reps} processes x {args.steps} steps, one thread")  # fmt: skip
    print()
    print("| fragment | rows per model | native ms/step | portable ms/step | portable / native "
          "| largest output difference |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for case in best["native"]:
        short_k, batch = case.split("@")
        short, k = short_k.split("#")
        diff = max(abs(a - b) for a, b in zip(outs["native"][case], outs["portable"][case]))
        n, p = best["native"][case], best["portable"][case]
        print(f"| {short} #{k} | {batch} | {n:.2f} | {p:.2f} | {p / n:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
