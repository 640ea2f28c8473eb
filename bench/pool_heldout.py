"""Do the held-out figures hold on another set of held-out seeds?

An experiment's tables come from ten held-out seeds. Rerun its command into a copy of its
output with `--heldout-seeds` set to a disjoint set (the searches replay from the cache;
only the held-out evaluations are new), then pool: this prints, per row, the held-out
security and reward on each set of seeds and on all of them together, and the first
target's clauses (engine above the even split / the median random design / the middle
designs, beyond the spread) on each set and pooled.

    python bench/pool_heldout.py --result results/engine-fashion-1pc-eval3/fashion-mnist-small-4/result.json \
        --result results/engine-fashion-1pc-eval3-seeds110/fashion-mnist-small-4/result.json \
        [--fraction 0.003] [--out results/engine-fashion-1pc-eval3-pooled]

Writes OUT/README.md and OUT/pooled.json (no evaluation: it reads the runs' caches).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))


def main() -> None:
    from qumos.search.pooled import load_run, pool
    from qumos.search.report import markdown_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--result", action="append", required=True, help="a run's result.json (twice or more)"
    )
    ap.add_argument("--fraction", type=float, help="the setting (default: the first)")
    ap.add_argument("--out", help="where README.md and pooled.json go (default: print only)")
    args = ap.parse_args()
    if len(args.result) < 2:
        ap.error("--result: give two runs or more (the same experiment, disjoint held-out seeds)")
    try:
        runs = [load_run(Path(p), args.fraction) for p in args.result]
        pooled = pool(runs)
    except ValueError as e:
        ap.error(f"--result: {e}")
    text = render(pooled) + "\n\n## Pooled table\n\n" + markdown_table(pooled["rows"]) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        cmd = "python bench/pool_heldout.py " + " ".join(
            [f"--result {p}" for p in args.result]
            + ([f"--fraction {args.fraction:g}"] if args.fraction is not None else [])
            + [f"--out {args.out}"]
        )
        (out / "README.md").write_text(
            f"# {pooled['task']}, labelled fraction {pooled['fraction']:g}: the held-out "
            f"figures on disjoint sets of held-out seeds\n\nCommand: `{cmd}`\n\n" + text
        )
        (out / "pooled.json").write_text(json.dumps(pooled, indent=1))


def _seeds(seeds: list[int]) -> str:
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seeds " + ",".join(map(str, seeds))


def _f(v: list) -> str:
    return "-" if v is None or v[0] is None else f"{v[0]:.3f} ± {v[1] or 0.0:.3f}"


def render(pooled: dict) -> str:
    runs = pooled["runs"]
    heads = [_seeds(r["heldout_seeds"]) for r in runs]
    heads.append(f"all {len(pooled['heldout_seeds'])} seeds")
    lines = [
        "Mean ± std over search seeds (the middle row: over its designs) of each final "
        "design's held-out figure.\n",
        "| row | figure | " + " | ".join(heads) + " |",
        "|---|---|" + "---|" * len(heads),
    ]
    for row in pooled["rows"]:
        for fig in ("security", "reward"):
            cells = [_f(r[fig].get(row["method"])) for r in runs] + [_f(row[fig])]
            lines.append(f"| {row['method']} | {fig} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The first target's clauses: the engine's mean security above the baseline's, "
        "against the spread (the sum of the two stds); `yes` when beyond it.\n",
        "| clause | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(heads),
    ]
    for base in pooled["margins"]:
        cells = []
        for m in [r["margins"].get(base) for r in runs] + [pooled["margins"][base]]:
            cells.append(
                "-" if m is None else f"{m[0]:.3f} vs {m[1]:.3f}: {'yes' if m[0] > m[1] else 'no'}"
            )
        lines.append(f"| engine above {base} | " + " | ".join(cells) + " |")
    checks = [r["checks"] for r in runs] + [pooled["checks"]]
    gaps = [r["value_gap"] for r in runs] + [pooled["value_gap"]]
    lines.append("| value gap | " + " | ".join(f"{g:.3f}" for g in gaps) + " |")
    for key in (
        "engine_security_ge_0.7",
        "engine_accuracy_gap_to_centralized",
        "engine_reward_minus_random",
        "engine_vs_random_inside_spread",
    ):
        cells = [
            "-"
            if key not in c
            else (f"{c[key]:+.3f}" if not isinstance(c[key], bool) else ("yes" if c[key] else "no"))
            for c in checks
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
