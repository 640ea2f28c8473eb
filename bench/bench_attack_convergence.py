"""Is the attacker converged? Each strategy's accuracy at the default budget and at twice
it (twice the training steps; twice the restarts), side by side in one run.

    python bench/bench_attack_convergence.py [--seeds 0,1,2] [--designs ...] [--out DIR]

For each reference design (digits-4): train the victims as the security engine does
(10 epochs, seed s), run the `breach` profile (qumos.attack.driver.evaluate_victims) with the
default AttackConfig, with `epochs` doubled and with `restarts` doubled, and print per
design and strategy the mean test accuracy over seeds under each budget, and for the
figures that matter (S, the best reference, and A_j, the best theft of each provider)
the change. The default budget is converged when doubling moves the mean of S and every
A_j by less than 0.01. Results are cached per (design, seed, budget) in
OUT/cache.jsonl, so an interrupted run resumes; the table goes to OUT/README.md too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))

REFERENCE_DESIGNS = ("u3cu3:6", "u3cu3:2-2-2", "rzz_ry:4-u3cu3:2R-rxyz_cnot:5R", "rxyz_cnot:2-2-2")


def main() -> None:
    import torch
    from qumos.attack import AttackConfig
    from qumos.attack.driver import evaluate_victims
    from qumos.datasets import load_task
    from qumos.search.evaluator import EvalConfig, train_victims
    from qumos.spec import parse_short_design

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--designs", default=",".join(REFERENCE_DESIGNS))
    ap.add_argument("--out", default=str(ROOT / "results" / "attack-convergence"))
    ap.add_argument("--victim-epochs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    designs = [d for d in args.designs.split(",") if d]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "cache.jsonl"
    cache: dict[str, dict] = {}
    if cache_path.is_file():
        for line in cache_path.read_text().splitlines():
            try:
                r = json.loads(line)
                cache[r["key"]] = r
            except (json.JSONDecodeError, KeyError):
                pass
    base = AttackConfig()
    budgets = {
        "default": {},
        "2x epochs": {"epochs": 2 * base.epochs},
        "2x restarts": {"restarts": 2 * base.restarts},
    }
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    for short in designs:
        victims = None
        for bname, over in budgets.items():
            keys = {s: f"{short}|{s}|{bname}|{base.epochs}x{base.restarts}" for s in seeds}
            if all(k in cache for k in keys.values()):
                continue
            if victims is None:
                design = parse_short_design(short, "digits", 4)
                datas = [load_task("digits", 4, seed=s) for s in seeds]
                specs, _ = train_victims(
                    design, datas, EvalConfig(seeds=tuple(seeds), victim_epochs=args.victim_epochs)
                )
                victims = list(zip(seeds, specs, datas))
            t0 = time.perf_counter()
            rep = evaluate_victims(victims, AttackConfig(**over)).to_dict()
            seconds = time.perf_counter() - t0
            for r in rep["records"]:
                rec = {
                    "key": keys[r["seed"]],
                    "design": short,
                    "seed": r["seed"],
                    "budget": bname,
                    "victim_acc": r["victim_acc"],
                    "S": r["S"],
                    "S_reference": r["S_reference"],
                    "references": {n: v["test_acc"] for n, v in r["references"].items()},
                    "providers": {
                        u["provider"]: {
                            "A": u["A"],
                            **{n: v["test_acc"] for n, v in u["strategies"].items()},
                        }
                        for u in r["units"]
                    },
                    "seconds": seconds / len(seeds),
                    "load": os.getloadavg()[0],
                }
                cache[rec["key"]] = rec
                with cache_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            print(
                f"{short} {bname}: S {[round(r['S'], 3) for r in rep['records']]} "
                f"({seconds:.0f} s for {len(seeds)} seeds)",
                flush=True,
            )
    table = render(cache, designs, seeds, list(budgets), base)
    print(table)
    (out / "README.md").write_text(
        "# Attack convergence (digits-4, breach profile)\n\n"
        f"Command: `python bench/bench_attack_convergence.py --seeds {args.seeds}`\n\n"
        f"Load average at start: {load[0]:.2f}. Default budget: {base.epochs} steps x "
        f"{base.restarts} restarts, learning rates {list(base.lrs)} cycled.\n\n" + table + "\n"
    )


def _mean(vals: list) -> float:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else float("nan")


def render(cache: dict, designs: list[str], seeds: list[int], budgets: list[str], base) -> str:
    lines = [
        "| design | figure | " + " | ".join(budgets) + " | max change |",
        "|---|---|" + "---|" * (len(budgets) + 1),
    ]
    worst = 0.0
    for short in designs:
        recs = {
            b: [cache.get(f"{short}|{s}|{b}|{base.epochs}x{base.restarts}") for s in seeds]
            for b in budgets
        }
        if any(r is None for rs in recs.values() for r in rs):
            lines.append(f"| {short} | (incomplete) |" + " |" * (len(budgets) + 1))
            continue
        rows = [("S (best reference)", lambda r: r["S"])]
        for n in recs["default"][0]["references"]:
            rows.append((f"  {n}", lambda r, n=n: r["references"].get(n)))
        for p in recs["default"][0]["providers"]:
            rows.append((f"A {p}", lambda r, p=p: r["providers"][p]["A"]))
            for n in recs["default"][0]["providers"][p]:
                if n != "A":
                    rows.append((f"  {p} {n}", lambda r, p=p, n=n: r["providers"][p].get(n)))
        for label, get in rows:
            vals = [_mean([get(r) for r in recs[b]]) for b in budgets]
            change = max(abs(v - vals[0]) for v in vals[1:])
            if not label.startswith("  "):
                worst = max(worst, change)
            lines.append(
                f"| {short} | {label} | "
                + " | ".join(f"{v:.3f}" for v in vals)
                + f" | {change:.3f} |"
            )
    lines.append("")
    lines.append(
        f"Largest change of S or an A_j when the budget doubles: {worst:.3f} "
        f"(mean over seeds {seeds}; converged if < 0.01)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
