"""Security engine: time per candidate evaluation, and the speed-up of 2 workers over 1.

The same candidates (seeded random designs) are evaluated in one run by the serial
executor and by a 2-process pool (pool start-up included in its wall time, and shown
separately); each worker uses one torch thread. Prints a table of ratios.

    python bench/bench_search.py [--candidates 4] [--victim-epochs 2] [--attack-epochs 2]

`--strong`: the search's throughput at the strong default instead (the converged
`breach` attacker, victim 10 epochs, `--eval-seeds` evaluation seeds): the same
candidates evaluated one training at a time (`batched=False`, the evaluator before
batched training) and batched (`qumos.stacked.fit_many`, after), interleaved candidate by
candidate in one process on one core, as designs per hour per core, with the largest
difference between the two paths' figures.

    python bench/bench_search.py --strong --candidates 2 --eval-seeds 0
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--fragments", type=int, default=3)
    ap.add_argument("--max-depth", type=int, default=2)
    ap.add_argument("--victim-epochs", type=int, default=2)
    ap.add_argument("--attack-epochs", type=int, default=2)
    ap.add_argument("--attack-restarts", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--strong",
        action="store_true",
        help="throughput at the strong default, one-by-one against batched",
    )
    ap.add_argument("--eval-seeds", default="0", help="--strong: evaluation seeds")
    args = ap.parse_args()
    if args.strong:
        return strong(args)

    import torch
    from qumos.search.env import DesignSpace
    from qumos.search.evaluator import EvalConfig, evaluate_design
    from qumos.search.parallel import PoolExecutor, SerialExecutor

    torch.set_num_threads(1)
    space = DesignSpace(
        "digits", 4, n_fragments=args.fragments, depths=tuple(range(1, args.max_depth + 1))
    )
    rng = np.random.default_rng(args.seed)
    designs = [space.sample(rng) for _ in range(args.candidates)]
    cfg = EvalConfig(
        seeds=(0,),
        victim_epochs=args.victim_epochs,
        attack_epochs=args.attack_epochs,
        attack_restarts=args.attack_restarts,
    )
    jobs = [(d.model_dump(), cfg) for d in designs]
    evaluate_design(jobs[0])  # warm the data loader and imports in this process

    t0 = time.perf_counter()
    serial = SerialExecutor().map(evaluate_design, jobs)
    t_serial = time.perf_counter() - t0

    t0 = time.perf_counter()
    pool = PoolExecutor(2)
    pool.map(_warm, [jobs[0], jobs[0]])  # start both workers; each warms like the serial side
    t_start = time.perf_counter() - t0
    par = pool.map(evaluate_design, jobs)
    t_pool = time.perf_counter() - t0
    pool.close()

    same = all(
        a["victim_acc"] == b["victim_acc"] and a.get("worst_leak") == b.get("worst_leak")
        for a, b in zip(serial, par)
    )
    per = [r["seconds"] for r in serial]
    print(
        f"# bench_search: {args.candidates} candidates, digits-4, K={args.fragments}, depths "
        f"1-{args.max_depth}, victim {args.victim_epochs} epochs, attacks {args.attack_epochs} "
        f"epochs x {args.attack_restarts} restart(s), 1 seed; cpus={os.cpu_count()} "
        f"loadavg={os.getloadavg()[0]:.1f}"
    )
    print("| executor | wall (s) | per candidate (s) | speed-up vs 1 worker |")
    print("|---|---|---|---|")
    print(f"| 1 worker (serial) | {t_serial:.1f} | {t_serial / len(jobs):.1f} | 1.00 |")
    print(
        f"| 2 workers (pool, incl. {t_start:.1f}s start-up) | {t_pool:.1f} | "
        f"{t_pool / len(jobs):.1f} | {t_serial / t_pool:.2f} |"
    )
    print(
        f"| 2 workers (pool, excl. start-up) | {t_pool - t_start:.1f} | "
        f"{(t_pool - t_start) / len(jobs):.1f} | {t_serial / (t_pool - t_start):.2f} |"
    )
    print(
        f"\nper-candidate evaluation time (serial): min {min(per):.1f}s, median "
        f"{float(np.median(per)):.1f}s, max {max(per):.1f}s; identical results: {same}"
    )


def strong(args) -> None:
    """Designs per hour per core at the strong default: one-by-one against batched."""
    import torch
    from qumos.search.env import DesignSpace
    from qumos.search.evaluator import EvalConfig, evaluate_design, reward
    from qumos.search.report import cell_text
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    space = DesignSpace("digits", 4, n_fragments=args.fragments)
    rng = np.random.default_rng(args.seed)
    designs = [space.sample(rng) for _ in range(args.candidates)]
    cfg = EvalConfig(seeds=tuple(int(s) for s in args.eval_seeds.split(",")))
    evaluate_design((designs[0].model_dump(), cfg.with_(attacks=False)))  # warm imports, data
    times: dict[str, list[float]] = {"one-by-one": [], "batched": []}
    rows = []
    with threadpool_limits(1):
        for d in designs:
            recs = {}
            for name, batched in (("one-by-one", False), ("batched", True)):
                c0 = time.process_time()
                recs[name] = evaluate_design((d.model_dump(), cfg.with_(batched=batched)))
                times[name].append(time.process_time() - c0)
                print(f"  {d.short()} {name}: {times[name][-1]:.1f} s CPU", flush=True)
            rows.append((d.short(), recs["one-by-one"], recs["batched"]))
    print(
        f"# bench_search --strong: {len(designs)} random 3-fragment digits-4 designs, "
        f"evaluation seeds {list(cfg.seeds)}, profile {cfg.attack_profile}, "
        f"{cfg.attack_epochs} steps x {cfg.attack_restarts} restarts, victim "
        f"{cfg.victim_epochs} epochs; one core; loadavg={os.getloadavg()[0]:.1f}"
    )
    print("| evaluator | CPU s per design (mean) | designs per hour per core | ratio |")
    print("|---|---|---|---|")
    base = float(np.mean(times["one-by-one"]))
    for name, ts in times.items():
        m = float(np.mean(ts))
        print(f"| {name} | {m:.1f} | {3600 / m:.1f} | {base / m:.2f} |")
    print(
        "\nThe two paths' figures (one-by-one / batched; float32 training, so they differ by "
        "rounding; security is a ratio with acc - S in its denominator, and when acc <= S "
        "a step: 1 if an attacker reaches acc, else 0):\n"
    )
    print("| design | accuracy | S | worst A_j | reward (lambda 1) | security |")
    print("|---|---|---|---|---|---|")
    for short, a, b in rows:
        cells = [
            f"{a[k][0]:.3f} / {b[k][0]:.3f}" for k in ("victim_acc", "S", "worst_attacker_acc")
        ]
        cells.append(f"{reward(a, 1.0):.3f} / {reward(b, 1.0):.3f}")
        cells.append(f"{a['security'][0]:.3f} / {b['security'][0]:.3f}")
        print(f"| `{cell_text(short)}` | " + " | ".join(cells) + " |")


def _warm(job):
    """Warm one worker the way the serial side was warmed: imports and the task's data.
    The sleep keeps the first worker busy so that the second one takes the other call."""
    from qumos.search.evaluator import EvalConfig, evaluate_design

    design, _ = job
    evaluate_design((design, EvalConfig(seeds=(0,), victim_epochs=1, attacks=False)))
    time.sleep(1.0)


if __name__ == "__main__":
    main()
