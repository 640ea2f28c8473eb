"""The old experiments' winners under the strong adversary: old reward against new.

The results of the first engine experiments (results/digits-4-target, digits-2-small,
digits-4-small, digits-4-rollout4, mnist-small-small) were scored with the weak attacker
(10 epochs x 2 restarts) and the old reward `acc - lambda * max_j (A_j - S_scratch)`:
S the scratch QNN of the design's own architecture, the gain not clipped. This re-evaluates
each of their final designs with the strong default `breach` profile (75 steps x 24
restarts, every strategy) on held-out seeds never used by those searches, at the old
attacker budget (labelled fraction 0.05), and prints, per design:

    reported   the reward the old table printed (weak attacker, old formula, search seeds)
    old        the old formula under the strong attacker (held-out seeds)
    new        acc - lambda * max(0, max_j (A_j - S)), S the best no-theft reference

Resumable: evaluations are cached in results/old-winners/cache.jsonl.

    python bench/bench_old_winners.py [--seeds 100,101,102] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))

OLD = [
    "digits-4-target",
    "digits-2-small",
    "digits-4-small",
    "digits-4-rollout4",
    "mnist-small-small",
]


def old_winners() -> list[dict]:
    out = []
    for name in OLD:
        path = ROOT / "results" / name / "results.json"
        if not path.is_file():
            continue
        for res in json.loads(path.read_text())["results"]:
            for row in res["rows"]:
                rec = row.get("record")
                if not rec or row["design"] == "-":
                    continue
                out.append(
                    {
                        "run": name,
                        "task": res["task"],
                        "method": row["method"],
                        "design": rec["design"],
                        "short": rec["short"],
                        "reported": row["reward"],
                    }
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="100,101,102")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "old-winners")
    args = ap.parse_args()
    from qumos.search.evaluator import EvalCache, EvalConfig, Evaluator, old_reward, reward
    from qumos.search.parallel import make_executor
    from qumos.search.report import cell_text
    from qumos.spec import Design

    seeds = tuple(int(s) for s in args.seeds.split(","))
    cfg = EvalConfig(seeds=seeds, attack_fraction=0.05)
    rows = old_winners()
    designs = {
        Design.model_validate(r["design"]).key(): Design.model_validate(r["design"]) for r in rows
    }
    ex = make_executor(args.workers)
    try:
        ev = Evaluator(
            cfg,
            lam=1.0,
            cache=EvalCache(args.out / "cache.jsonl"),
            executor=ex,
            on_record=lambda rec, fresh: print(
                f"  evaluated {rec['short']} ({rec['seconds']:.0f} s)", flush=True
            ),
        )
        recs = {r["key"]: r for r in ev.evaluate_many(list(designs.values()))}
    finally:
        ex.close()
    lines = [
        f"Old winners under the strong `breach` profile (fraction 0.05), held-out seeds "
        f"{list(seeds)}; `python bench/bench_old_winners.py --seeds {args.seeds}`.\n",
        "| run | task | method | design | reported (weak, old formula) | old formula, "
        "strong | new reward | accuracy | S (reference) | worst A_j | security |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        rec = recs[Design.model_validate(r["design"]).key()]
        lines.append(
            f"| {r['run']} | {r['task']} | {r['method']} | `{cell_text(r['short'])}` | "
            f"{r['reported']:.3f} | {old_reward(rec, 1.0):.3f} | {reward(rec, 1.0):.3f} | "
            f"{rec['victim_acc'][0]:.3f} ± {rec['victim_acc'][1]:.3f} | {rec['S'][0]:.3f} "
            f"({', '.join(sorted(set(rec['S_reference'])))}) | "
            f"{rec['worst_attacker_acc'][0]:.3f} | {rec['security'][0]:.3f} ± "
            f"{rec['security'][1]:.3f} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "README.md").write_text("# " + __doc__.splitlines()[0] + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
