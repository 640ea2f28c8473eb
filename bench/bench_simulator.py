"""Forward+backward throughput of the torch simulator against PennyLane and the flop floor.

    python bench/bench_simulator.py                  # the table in the README
    python bench/bench_simulator.py --min-time 0.2   # quicker, noisier

What is timed, per (fragment, batch B): one training-style step on fixed random inputs

    out = sim(x, w)              # x (B, 16) input angles, w (n_params,) weights
    out.sum().backward()         # gradients w.r.t. both x and w

for
- ours: `qumos.torchsim.FragmentSim` (complex64 / float32), with its batch part in the C
  kernels (`qumos.kernels`) when they compile here; and, when they do, the same simulator
  with the batch part as torch ops (`ours, torch only`: the fallback without a compiler);
- PennyLane `default.qubit`, torch interface, diff_method="backprop" (its fastest
  simulator gradient), fed float32 tensors like ours, with parameter broadcasting:
  the whole batch goes through one QNode call, the same circuit built gate by gate from
  `FragmentSpec.ops()`. Its outputs are checked against ours to 1e-5 before timing;
- the floor: `achievable_flops / flops_per_sample(spec)`, where achievable_flops is
  measured here with a large complex64 matmul (torch, same thread count) and
  `qumos.torchsim.flops_per_sample` counts the real flops of our method per sample.

Both simulators run on one torch thread (torch.set_num_threads(1)): the machine is shared,
and one thread makes the ratios independent of the core count. Times are process CPU time
(`time.process_time`), for the same reason. Steps of ours and PennyLane's alternate (one
each per round), and the flop rate is re-measured before each row, so all three see the
same machine state. Each measurement repeats the step until it has >= --min-time seconds
and at least 3 steps, then reports the median step time (bounded: --max-reps steps).

Fragments: 4 and 8 qubits, rxyz_cnot, depth 2, ring, 16 inputs (the default design's).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import numpy as np
import torch
from qumos import kernels
from qumos.spec import FragmentSpec
from qumos.torchsim import FragmentSim, flops_per_sample

BATCHES = (1, 32, 256, 1024)
# Process CPU time, not wall time: on a shared machine the wall clock also counts the time
# other processes hold the core; on an idle machine the two agree (one torch thread).
CLOCK = time.process_time


# ---- PennyLane: the same circuit, gate by gate from FragmentSpec.ops() -----------------
def _pl_gate(op, angles):
    """One Op as a PennyLane operation. Wires map 1:1 (our qubit q = PennyLane wire q).

    PennyLane orders its statevector with wire 0 most significant, qiskit (and we) with
    qubit 0 least significant; that only permutes basis states, and we read out <Z_q> per
    qubit, so the outputs are the same. Two-qubit gates: in both conventions the op's
    first wire is the more significant index of the 4x4 matrix, so matrices carry over.
    """
    import pennylane as qml

    g, w = op.gate, list(op.wires)
    if g == "rx":
        return qml.RX(angles[0], wires=w)
    if g == "ry":
        return qml.RY(angles[0], wires=w)
    if g == "rz":
        return qml.RZ(angles[0], wires=w)
    if g == "u3":  # qml.U3(theta, phi, delta) is qiskit's U3(theta, phi, lambda)
        return qml.U3(*angles, wires=w)
    if g == "cu3":  # controlled U3 (qiskit CUGate(theta, phi, lam, gamma=0)); not CRot,
        # which is RZ RY RZ: equal to U3 only up to a phase that matters once controlled
        return qml.ctrl(qml.U3(*angles, wires=w[1]), control=w[0])
    if g == "cx":
        return qml.CNOT(wires=w)
    if g == "cz":
        return qml.CZ(wires=w)
    if g == "rzz":  # exp(-i t/2 Z Z)
        return qml.IsingZZ(angles[0], wires=w)
    if g == "rxx":  # exp(-i t/2 X X)
        return qml.IsingXX(angles[0], wires=w)
    if g == "rzx":  # exp(-i t/2 Z_w0 X_w1), qiskit's rzx(t, w0, w1)
        return qml.PauliRot(angles[0], "ZX", wires=w)
    raise ValueError(f"no PennyLane mapping for gate {g!r}")


def pennylane_sim(spec: FragmentSpec):
    """(x (B, n_inputs), w (n_params,)) -> (B, n_qubits) <Z_q>, broadcast over the batch."""
    import pennylane as qml  # the bench extra; --skip-pennylane runs without it

    dev = qml.device("default.qubit", wires=spec.n_qubits)
    ops = spec.ops()

    @qml.qnode(dev, interface="torch", diff_method="backprop")
    def circuit(x, w):
        for op in ops:
            if op.source == "input":
                angles = [x[:, i] for i in op.index]  # (B,): broadcast
            elif op.source == "param":
                angles = [w[i] for i in op.index]
            else:
                angles = []
            _pl_gate(op, angles)
        return [qml.expval(qml.PauliZ(q)) for q in range(spec.n_qubits)]

    def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = circuit(x, w)
        out = torch.stack(list(out), dim=-1)  # (B, n) (or (n,) for B == 1 without broadcast)
        return out.reshape(x.shape[0], spec.n_qubits)

    return run


def check_agree(spec: FragmentSpec, ours, theirs, n: int = 4, seed: int = 0) -> float:
    """Max |ours - PennyLane| on random inputs (float64 for ours); raises above 1e-5."""
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.uniform(-math.pi, math.pi, (n, spec.n_inputs)))
    w = torch.tensor(spec.params)
    a = FragmentSim(spec, dtype=torch.float64)(x, w).detach().numpy()
    b = theirs(x.float(), w.float()).detach().double().numpy()
    c = ours(x.float(), w.float()).detach().double().numpy()
    err = max(np.abs(a - b).max(), np.abs(a - c).max())
    if err > 1e-5:
        raise AssertionError(f"{spec.block} {spec.n_qubits}q: PennyLane and ours differ by {err:g}")
    return float(err)


# ---- timing ---------------------------------------------------------------------------
def time_steps(
    fns: dict, batch: int, spec: FragmentSpec, min_time: float, max_reps: int
) -> dict[str, float]:
    """Median seconds of one forward+backward step for each simulator in `fns`, measured
    interleaved (one step of each per round), so a shared machine's load hits all alike.
    Runs until every simulator has >= 3 steps and >= min_time seconds, or max_reps steps."""
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(batch, spec.n_inputs, generator=g) * 2 - 1) * math.pi
    w0 = torch.tensor(spec.params, dtype=torch.float32)

    def step(fn) -> float:
        t0 = CLOCK()
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        fn(x, w).sum().backward()
        assert x.grad is not None and w.grad is not None
        return CLOCK() - t0

    for fn in fns.values():
        step(fn)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    while True:
        for k, fn in fns.items():
            if len(times[k]) < 3 or (sum(times[k]) < min_time and len(times[k]) < max_reps):
                times[k].append(step(fn))
        if all(len(t) >= 3 and (sum(t) >= min_time or len(t) >= max_reps) for t in times.values()):
            return {k: statistics.median(t) for k, t in times.items()}


def achievable_flops(size: int = 512, min_time: float = 0.3) -> float:
    """Real flops/s of a (size x size) @ (size x size) complex64 matmul: 8 size**3 flops
    (median of >= 3 runs)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, dtype=torch.complex64, generator=g)
    b = torch.randn(size, size, dtype=torch.complex64, generator=g)
    a @ b
    times: list[float] = []
    while len(times) < 3 or sum(times) < min_time:
        t0 = CLOCK()
        a @ b
        times.append(CLOCK() - t0)
    return 8 * size**3 / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description="torch simulator vs PennyLane vs flop floor")
    p.add_argument("--qubits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    p.add_argument("--max-reps", type=int, default=200, help="most steps per measurement")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-pennylane", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    qml_version = "skipped" if args.skip_pennylane else __import__("pennylane").__version__
    print(
        f"torch {torch.__version__}, pennylane {qml_version}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"thread(s), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )

    with_c = kernels.get() is not None
    print(
        "batch part: "
        + (
            "C kernels (qumos.kernels), also timed as torch ops"
            if with_c
            else "torch ops (the C kernels are unavailable here)"
        )
    )
    rows = []
    for n in args.qubits:
        spec = FragmentSpec(
            n_qubits=n, n_inputs=16, block="rxyz_cnot", depth=2, entanglement="ring"
        )
        rng = np.random.default_rng(n)
        spec = spec.with_params(rng.uniform(-math.pi, math.pi, spec.n_params).tolist())
        sim = FragmentSim(spec)
        fns = {"ours": sim}
        if with_c:

            def torch_only(x, w, sim=sim):  # the kernel is chosen in forward; backward follows
                kernels.set_mode("torch")
                try:
                    return sim(x, w)
                finally:
                    kernels.set_mode("auto")

            fns["ours-torch"] = torch_only
        if not args.skip_pennylane:
            fns["pennylane"] = pennylane_sim(spec)
            err = check_agree(spec, fns["ours"], fns["pennylane"])
            print(f"{n} qubits: PennyLane agrees with ours (max |diff| {err:.1e} <= 1e-5)")
        for b in args.batches:
            flops = achievable_flops()  # measured next to each row: the load changes
            t = time_steps(fns, b, spec, args.min_time, args.max_reps)
            so = b / t["ours"]
            sp = b / t["pennylane"] if "pennylane" in t else float("nan")
            st = b / t["ours-torch"] if "ours-torch" in t else float("nan")
            fps = flops_per_sample(spec, b)
            rows.append((n, b, so, st, sp, flops / fps, fps, flops))
            print(
                f"  {n}q B={b}: ours {so:,.0f}/s  torch only {st:,.0f}/s  pennylane "
                f"{sp:,.0f}/s  floor {flops / fps:,.0f}/s ({flops / 1e9:.1f} GFLOP/s)",
                flush=True,
            )

    print()
    print(
        "| qubits | batch | ours (samples/s) | ours, torch only (samples/s) | PennyLane "
        "(samples/s) | flop floor (samples/s) | ours / torch only | ours / PennyLane | "
        "ours / floor | flops per sample | machine GFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, b, so, st, sp, fl, fps, flops in rows:
        print(
            f"| {n} | {b} | {so:,.0f} | {st:,.0f} | {sp:,.0f} | {fl:,.0f} | {so / st:.2f}x | "
            f"{so / sp:.1f}x | 1/{fl / so:.1f} | {fps:,.0f} | {flops / 1e9:.1f} |"
        )


if __name__ == "__main__":
    main()
