"""How strong is the attacker? Every profile against one design, in one run.

    python bench/bench_attack_strength.py [--design rzz_ry:4-u3cu3:2R-rxyz_cnot:5R]
        [--seeds 0] [--queries 20,100,400] [--out results/attack-strength]

Trains the victim as the security engine does (digits-4, 10 epochs, seed s), then runs
`breach`, `queries` and `breach+queries` for each N in --queries (qumos.attack,
in process, the default converged budget) and prints per profile S (and which reference
won), every provider's A_j with the winning theft, leak, theft ratio, fidelity and the
security, with the wall and CPU time of each run and the load average. Results are
cached per (design, seed, profile, N) in OUT/cache.jsonl (an interrupted run resumes);
the table goes to OUT/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))


def main() -> None:
    import torch
    from qumos.attack import AttackConfig
    from qumos.attack.driver import evaluate_victims
    from qumos.datasets import load_task
    from qumos.search.evaluator import EvalConfig, train_victims
    from qumos.spec import parse_short_design

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--design", default="rzz_ry:4-u3cu3:2R-rxyz_cnot:5R")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--task", type=int, default=4)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--queries", default="20,100,400")
    ap.add_argument("--victim-epochs", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "results" / "attack-strength"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    ns = [int(n) for n in args.queries.split(",") if n]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "cache.jsonl"
    cache = {}
    if cache_path.is_file():
        for line in cache_path.read_text().splitlines():
            try:
                r = json.loads(line)
                cache[r["key"]] = r
            except (json.JSONDecodeError, KeyError):
                pass
    runs = [("breach", 0)] + [(p, n) for n in ns for p in ("queries", "breach+queries")]
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    keys = []
    for profile, n in runs:
        key = f"{args.dataset}-{args.task}|{args.design}|{args.seeds}|{profile}|{n}"
        keys.append(key)
        if key in cache:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        datas = [load_task(args.dataset, args.task, seed=s) for s in seeds]
        design = parse_short_design(args.design, args.dataset, args.task)
        specs, _ = train_victims(
            design, datas, EvalConfig(seeds=tuple(seeds), victim_epochs=args.victim_epochs)
        )
        rep = evaluate_victims(
            list(zip(seeds, specs, datas)), AttackConfig(profile=profile, queries=max(n, 1))
        ).to_dict()
        rec = {
            "key": key,
            "profile": profile,
            "queries": n,
            "report": rep,
            "wall": time.perf_counter() - t0,
            "cpu": time.process_time() - c0,
            "load": os.getloadavg()[0],
        }
        cache[key] = rec
        with cache_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(
            f"{profile} N={n}: S {rep['S'][0]:.3f} ({rep['S_reference']}) A "
            f"{[round(p['A'][0], 3) for p in rep['providers']]} "
            f"({rec['wall']:.0f} s wall)",
            flush=True,
        )
    table = render([cache[k] for k in keys], args)
    print(table)
    (out / "README.md").write_text(
        f"# Attack strength: {args.dataset}-{args.task}, design `{args.design}`\n\n"
        f"Command: `python bench/bench_attack_strength.py --design '{args.design}' "
        f"--seeds {args.seeds} --queries {args.queries}`\n\nVictim: {args.victim_epochs} "
        f"epochs, seed(s) {args.seeds}. Load average at start: {load[0]:.2f}.\n\n" + table + "\n"
    )


def _f(v) -> str:
    if v is None or v[0] is None:
        return "-"
    return f"{v[0]:.3f} ± {v[1]:.3f}"


def render(recs: list[dict], args) -> str:
    lines = [
        "| profile | N | victim | S (reference) | breached: A_j (theft) | worst leak | "
        "security | wall s | cpu s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        d = r["report"]
        provs = (
            "; ".join(
                f"{p['provider']} {_f(p['A'])} ({p['best_strategy']})" for p in d["providers"]
            )
            or "-"
        )
        worst = "-" if d["security"] is None else f"{1 - d['security'][0]:.3f}"
        lines.append(
            f"| {r['profile']} | {r['queries'] or '-'} | {_f(d['victim_acc'])} | "
            f"{_f(d['S'])} ({d['S_reference']}) | {provs} | {worst} | "
            f"{_f(d['security'])} | {r['wall']:.0f} | {r['cpu']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
