"""One design evaluation on this checkout against another git revision, side by side.

    python bench/bench_revisions.py --baseline REV [--designs ...] [--seeds 0,1,2] [--reps 2]

A code change that is meant to make evaluations faster (the simulator, the batched
trainer) is timed against the revision before it, in one run: the baseline is checked
out into a temporary `git worktree`, and each design's evaluation (the security engine's
`evaluate_design`, default strong `breach` profile, digits-4) runs in a fresh process per
tree, alternating baseline / current `--reps` times, so machine drift hits both alike.
One torch thread, one BLAS thread; each process evaluates the design once untimed
(compiling, caches, the classical references) and then once timed, as a search sees
every design after its first. Prints CPU seconds (best of the reps), the ratio, and the
figures of both (they differ where float rounding changed a training path). Needs git
and the baseline's own dependencies to be this environment's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DESIGNS = ("u3cu3:2-2-2", "rzz_ry:4-u3cu3:2R-rxyz_cnot:5R", "rxyz_cnot:2-2-2")

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from threadpoolctl import threadpool_limits
from qumos.search.evaluator import EvalConfig, evaluate_design
from qumos.spec import parse_short_design
torch.set_num_threads(1)
cfg = EvalConfig(seeds=tuple(int(s) for s in sys.argv[3].split(",")))
design = parse_short_design(sys.argv[2]).model_dump()
with threadpool_limits(1):
    evaluate_design((design, cfg))
    t0 = time.process_time()
    rec = evaluate_design((design, cfg))
    cpu = time.process_time() - t0
print(json.dumps({"cpu": cpu, "security": rec["security"], "victim_acc": rec["victim_acc"]}))
"""


def _run(shared: Path, design: str, seeds: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(shared)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(shared), design, seeds],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"evaluation of {design} in {shared} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="git revision to compare against")
    ap.add_argument("--designs", default=",".join(DEFAULT_DESIGNS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error(f"--reps is {args.reps}; allowed: 1 or more")
    rev = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--short", args.baseline + "^{commit}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if rev.returncode != 0:
        ap.error(f"--baseline: {args.baseline!r} is not a commit of this repository")
    base_rev = rev.stdout.strip()
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "shared"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    current = f"{head}{' + uncommitted changes' if dirty else ''}"
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qumos-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), base_rev],
            check=True,
        )
        try:
            for design in args.designs.split(","):
                runs: dict[str, list[dict]] = {"baseline": [], "current": []}
                for rep in range(args.reps):
                    for name, shared in (
                        ("baseline", tree / "shared"),
                        ("current", ROOT / "shared"),
                    ):
                        runs[name].append(_run(shared, design, args.seeds))
                        print(
                            f"{design} rep {rep + 1}/{args.reps} {name}: "
                            f"{runs[name][-1]['cpu']:.1f} s cpu",
                            flush=True,
                        )
                rows.append((design, runs))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
            )
    end = os.getloadavg()
    lines = [
        f"baseline {base_rev}, current {current}; seeds {args.seeds}; best of {args.reps} "
        f"alternating runs; load average {load[0]:.2f} at start, {end[0]:.2f} at end",
        "",
        "| design | baseline cpu s (runs) | current cpu s (runs) | baseline / current | "
        "security baseline -> current |",
        "|---|---|---|---|---|",
    ]
    for design, runs in rows:
        b = [r["cpu"] for r in runs["baseline"]]
        c = [r["cpu"] for r in runs["current"]]
        sec = f"{runs['baseline'][0]['security']} -> {runs['current'][0]['security']}"
        lines.append(
            f"| {design} | {min(b):.1f} ({', '.join(f'{v:.1f}' for v in b)}) | "
            f"{min(c):.1f} ({', '.join(f'{v:.1f}' for v in c)}) | {min(b) / min(c):.2f}x | {sec} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        cmd = " ".join(["python bench/bench_revisions.py", *sys.argv[1:]])
        Path(args.out).write_text(
            f"# One design evaluation: {current} against {base_rev}\n\nCommand: `{cmd}`\n\n"
            + table
            + "\n"
        )


if __name__ == "__main__":
    main()
