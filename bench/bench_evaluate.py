"""What one design evaluation costs: batched training against one-by-one, side by side.

    python bench/bench_evaluate.py [--seeds 0,1,2] [--designs ...] [--repeats 1]

For each reference design (digits-4) the security engine's evaluation -- the victims of
every seed trained together, then the default `breach` profile against every provider
(qumos.search.evaluator.evaluate_design) -- runs twice, interleaved: with the attacker's
trainings batched (`AttackConfig.batched`, the default: models of one architecture train
in one `fit_many` call) and one by one (`fit` per model). Prints wall and CPU seconds per
design for both, the ratio, and the largest difference between the two paths' figures
(victim accuracy, S, every A_j, security). One torch thread, one BLAS thread.
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


def main() -> None:
    import torch
    from qumos.search.evaluator import EvalConfig, evaluate_design
    from qumos.spec import parse_short_design
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--designs", default=",".join(REFERENCE_DESIGNS))
    ap.add_argument("--out", default=str(ROOT / "results" / "evaluate-speed.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = EvalConfig(seeds=tuple(int(s) for s in args.seeds.split(",")))
    load = os.getloadavg()
    rows = []
    with threadpool_limits(1):
        evaluate_design((parse_short_design("u3cu3:1").model_dump(), cfg.with_(seeds=(0,))))
        for short in args.designs.split(","):
            design = parse_short_design(short)
            res = {}
            for mode in ("one-by-one", "batched"):
                t0, c0 = time.perf_counter(), time.process_time()
                rec = evaluate_design((design.model_dump(), cfg.with_(batched=mode == "batched")))
                res[mode] = (time.perf_counter() - t0, time.process_time() - c0, rec)
            diff = max(
                abs(a - b)
                for a, b in zip(_figures(res["one-by-one"][2]), _figures(res["batched"][2]))
            )
            rows.append((short, res, diff))
            print(
                f"{short}: one-by-one {res['one-by-one'][1]:.1f} s cpu, batched "
                f"{res['batched'][1]:.1f} s cpu, figures differ by at most {diff:.3f}",
                flush=True,
            )
    end = os.getloadavg()
    lines = [
        f"load average {load[0]:.2f} at start, {end[0]:.2f} at end; seeds {args.seeds}; "
        "victim 10 epochs; default breach profile",
        "",
        "| design | one-by-one wall s | one-by-one cpu s | batched wall s | batched cpu s "
        "| cpu ratio | wall ratio | largest figure difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    tot = {"one-by-one": [0.0, 0.0], "batched": [0.0, 0.0]}
    for short, res, diff in rows:
        (w1, c1, _), (w2, c2, _) = res["one-by-one"], res["batched"]
        for k, (w, c) in (("one-by-one", (w1, c1)), ("batched", (w2, c2))):
            tot[k][0] += w
            tot[k][1] += c
        lines.append(
            f"| {short} | {w1:.1f} | {c1:.1f} | {w2:.1f} | {c2:.1f} | "
            f"{c1 / c2:.1f}x | {w1 / w2:.1f}x | {diff:.3f} |"
        )
    n = len(rows)
    lines.append(
        f"| mean per design | {tot['one-by-one'][0] / n:.1f} | "
        f"{tot['one-by-one'][1] / n:.1f} | {tot['batched'][0] / n:.1f} | "
        f"{tot['batched'][1] / n:.1f} | "
        f"{tot['one-by-one'][1] / tot['batched'][1]:.1f}x | "
        f"{tot['one-by-one'][0] / tot['batched'][0]:.1f}x | |"
    )
    table = "\n".join(lines)
    print(table)
    Path(args.out).write_text(
        "# Cost of one design evaluation: batched vs one-by-one\n\n"
        f"Command: `python bench/bench_evaluate.py --seeds {args.seeds}`"
        "\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
