"""Design matters: how much one breached provider leaks, per design, measured side by side.

    python bench/bench_attack.py --designs 1-4,2-2-2 --heads readout,linear --seeds 0,1,2 \
        --out results/attack_design_matters.md

For every (design, head): train the victim (digits-4 by default, `--victim-epochs`,
victim seed 0), then `qumos.attack.evaluate_security` breaches every provider in turn
with every white-box strategy for every seed. Prints (and writes to --out, markdown) one
row per (design, head, provider): victim accuracy, scratch S, each strategy's accuracy,
A_j, leak_j (mean ± std over seeds), and the wall time of that provider's attack.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--task", type=int, default=4)
    p.add_argument("--designs", default="1-4,2-2-2", help="comma-separated depth lists")
    p.add_argument("--heads", default="readout,linear")
    p.add_argument("--block", default="rxyz_cnot")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--victim-epochs", type=int, default=30)
    p.add_argument("--victim-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="markdown file to write")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from qumos.attack import WHITE_BOX, AttackBudget, evaluate_security
    from qumos.datasets import load_task
    from qumos.spec import design_from_flags
    from qumos.train import TrainConfig, train_design

    seeds = [int(s) for s in a.seeds.split(",")]
    budget = AttackBudget(fraction=a.fraction, epochs=a.epochs, restarts=a.restarts)
    data = load_task(a.dataset, a.task, seed=a.victim_seed)
    cmd = "python bench/bench_attack.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head_row = ("| design | head | victim | scratch S | provider | "
                + " | ".join(WHITE_BOX) + " | A_j | leak_j | attack s |")
    lines = [f"# Design matters ({a.dataset}-{a.task}, {a.block}, 4 qubits)", "",
             f"Command: `{cmd}`", "",
             f"Attacker budget: fraction {a.fraction}, {a.epochs} epochs, best of "
             f"{a.restarts} restarts (chosen on its own labelled data), seeds {seeds}. "
             f"Victim: {a.victim_epochs} epochs, seed {a.victim_seed}. Figures: mean ± "
             "std over seeds (std with ddof=0); leak per seed, then aggregated.", "",
             head_row, "|" + "---|" * (head_row.count("|") - 1)]
    print("\n".join(lines), flush=True)
    raw = []
    t_all = time.perf_counter()
    for frags in a.designs.split(","):
        for head in a.heads.split(","):
            design = design_from_flags(dataset=a.dataset, task=a.task, fragments=frags,
                                       block=a.block, head=head)
            spec, _, _ = train_design(design, data, TrainConfig(epochs=a.victim_epochs,
                                                                seed=a.victim_seed))
            rep = evaluate_security(spec, data, budget, seeds, workers=a.workers)
            d = rep.to_dict()
            raw.append({"design": frags, "head": head, **d})
            for pr in d["per_provider"]:
                bs = pr["by_strategy"]
                secs = sum(v["seconds"] for v in bs.values())
                row = (f"| {frags} | {head} | {d['victim_acc']:.3f} | "
                       f"{d['scratch'][0]:.3f} ± {d['scratch'][1]:.3f} | {pr['index']} | "
                       + " | ".join(f"{bs[s]['acc_mean']:.3f} ± {bs[s]['acc_std']:.3f}"
                                    for s in WHITE_BOX)
                       + f" | {pr['A'][0]:.3f} ± {pr['A'][1]:.3f} | "
                       f"**{pr['leak'][0]:.2f}** ± {pr['leak'][1]:.2f} | {secs:.0f} |")
                lines.append(row)
                print(row, flush=True)
            s = (f"|  {frags} | {head} | security {d['security'][0]:.2f} ± "
                 f"{d['security'][1]:.2f}, worst leak {d['worst_leak'][0]:.2f} | total "
                 f"{d['seconds']:.0f} s |")
            print(s, flush=True)
            raw[-1]["summary_line"] = s
    tail = ["", "Security per design (1 - worst leak, mean ± std over seeds):", ""]
    for r in raw:
        tail.append(f"- {r['design']} / {r['head']}: victim {r['victim_acc']:.3f}, scratch "
                    f"{r['scratch'][0]:.3f}, worst leak {r['worst_leak'][0]:.2f} ± "
                    f"{r['worst_leak'][1]:.2f}, security {r['security'][0]:.2f} ± "
                    f"{r['security'][1]:.2f}; attack on all providers {r['seconds']:.0f} s")
    tail.append(f"\nTotal wall time {time.perf_counter() - t_all:.0f} s "
                f"(workers={a.workers}).")
    print("\n".join(tail))
    lines += tail
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(lines) + "\n")
        a.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
