"""What one design evaluation costs: batched training against one-by-one, side by side.

    python bench/bench_evaluate.py [--seeds 0,1,2] [--designs ...] [--modes one-by-one,batched,search]

For each reference design (digits-4) the security engine's evaluation -- the victims of
every seed trained together, then the default `breach` profile against every provider
(qumos.search.evaluator.evaluate_design) -- runs twice, interleaved: with the attacker's
trainings batched (`AttackConfig.batched`, the default: models of one architecture train
in one `fit_many` call) and one by one (`fit` per model). Prints wall and CPU seconds per
design for both, the ratio, and the largest difference between the two paths' figures
(victim accuracy, S, every A_j, security). A third path, `search`, is the batched one with
the design-independent classical references already fitted (as every design after a
search's first sees them). One torch thread, one BLAS thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))

REFERENCE_DESIGNS = ("u3cu3:6", "u3cu3:2-2-2", "rzz_ry:4-u3cu3:2R-rxyz_cnot:5R", "rxyz_cnot:2-2-2")


def _figures(rec: dict) -> list[float]:
    out = [rec["victim_acc"][0], rec["S"][0], rec["security"][0]]
    return out + [a[0] for a in rec["attacker_acc"]]


MODES = ("one-by-one", "batched", "search")


def main() -> None:
    import torch
    from qumos.attack import references
    from qumos.search.evaluator import EvalConfig, evaluate_design
    from qumos.spec import parse_short_design
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--designs", default=",".join(REFERENCE_DESIGNS))
    ap.add_argument(
        "--modes",
        default=",".join(MODES),
        help="which paths to time: one-by-one, batched (both with no fitted reference "
        "kept), search (batched, the classical references already fitted, as every "
        "design after a search's first)",
    )
    ap.add_argument("--out", default=str(ROOT / "results" / "evaluate-speed.md"))
    args = ap.parse_args()
    modes = [m for m in MODES if m in args.modes.split(",")]
    bad = set(args.modes.split(",")) - set(MODES)
    if bad or not modes:
        ap.error(f"--modes: {sorted(bad) or 'none'} not allowed; allowed: {', '.join(MODES)}")
    torch.set_num_threads(1)
    cfg = EvalConfig(seeds=tuple(int(s) for s in args.seeds.split(",")))
    load = os.getloadavg()
    rows = []
    with threadpool_limits(1):
        evaluate_design((parse_short_design("u3cu3:1").model_dump(), cfg.with_(seeds=(0,))))
        for short in args.designs.split(","):
            design = parse_short_design(short)
            res = {}
            for mode in modes:
                if mode != "search":
                    references.classical_cache.clear()
                elif not references.classical_cache:  # the search's first design fits them
                    evaluate_design((design.model_dump(), cfg))
                t0, c0 = time.perf_counter(), time.process_time()
                rec = evaluate_design(
                    (design.model_dump(), cfg.with_(batched=mode != "one-by-one"))
                )
                res[mode] = (time.perf_counter() - t0, time.process_time() - c0, rec)
            figs = [_figures(r[2]) for r in res.values()]
            diff = max((abs(a - b) for f in figs[1:] for a, b in zip(figs[0], f)), default=0.0)
            rows.append((short, res, diff))
            print(
                f"{short}: "
                + ", ".join(f"{m} {res[m][1]:.1f} s cpu" for m in modes)
                + f"; figures differ by at most {diff:.3f}",
                flush=True,
            )
    end = os.getloadavg()
    base = modes[0]
    head = "| design | " + " | ".join(f"{m} wall s | {m} cpu s" for m in modes)
    head += "".join(f" | cpu {base} / {m}" for m in modes[1:]) + " | largest figure difference |"
    lines = [
        f"load average {load[0]:.2f} at start, {end[0]:.2f} at end; seeds {args.seeds}; "
        "victim 10 epochs; default breach profile",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    tot = {m: [0.0, 0.0] for m in modes}
    for short, res, diff in rows:
        cells = []
        for m in modes:
            w, c, _ = res[m]
            tot[m][0] += w
            tot[m][1] += c
            cells += [f"{w:.1f}", f"{c:.1f}"]
        cells += [f"{res[base][1] / res[m][1]:.1f}x" for m in modes[1:]]
        lines.append(f"| {short} | " + " | ".join(cells) + f" | {diff:.3f} |")
    n = len(rows)
    cells = [f"{tot[m][k] / n:.1f}" for m in modes for k in (0, 1)]
    cells += [f"{tot[base][1] / tot[m][1]:.1f}x" for m in modes[1:]]
    lines.append("| mean per design | " + " | ".join(cells) + " | |")
    table = "\n".join(lines)
    print(table)
    cmd = f"python bench/bench_evaluate.py --seeds {args.seeds}"
    if args.designs != ",".join(REFERENCE_DESIGNS):
        cmd += f" --designs {args.designs}"
    if modes != list(MODES):
        cmd += f" --modes {','.join(modes)}"
    if Path(args.out).resolve() != (ROOT / "results" / "evaluate-speed.md").resolve():
        cmd += f" --out {args.out}"
    Path(args.out).write_text(
        "# Cost of one design evaluation: batched vs one-by-one\n\n"
        f"Command: `{cmd}`\n\n"
        "one-by-one and batched fit every reference afresh; search is the batched path "
        "with the design-independent classical references (logistic regression, MLP, "
        "kNN) already fitted for these seeds, as for every design after a search's first."
        "\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
