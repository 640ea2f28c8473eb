"""Do the reported held-out figures survive a stronger attacker?

The experiment's tables (`qumos experiment`) give each final design's security under the
converged default attacker (75 steps x 24 restarts per strategy). An independent attacker
will be run on the designs we report, and our figures must hold within 0.05. This takes
one setting of an experiment's result.json, re-evaluates the final designs of the chosen
rows on the same held-out seeds with twice the training steps and with twice the
restarts, side by side with the default figures (read from the experiment's own cache),
and prints per row the held-out security, reward and accuracy under each budget (mean ±
std over search seeds) and the largest drop of a row's mean security.

    python bench/bench_reported_attack.py --result results/engine-5seeds/digits-4/result.json \
        [--fraction 0.01] [--rows "engine (PPO),random (median design)"] [--workers 2] \
        [--out results/reported-attack/digits-4-0.01]

With `--result` given twice or more (the same experiment rerun on disjoint held-out
seeds, as `bench/pool_heldout.py` pools them), each run's designs are re-evaluated on its
own held-out seeds and every figure is pooled over all of them: one record per design and
budget over every seed (`evaluator.pool_records`).

Resumable: the stronger budgets' evaluations are cached in OUT/cache.jsonl (a fresh OUT
can start from the caches of earlier reports on the same seeds, concatenated); the table
goes to OUT/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))

TOLERANCE = 0.05  # the independent attacker's check: held-out figures hold within this


def main() -> None:
    from qumos.search.evaluator import EvalCache, EvalConfig, Evaluator
    from qumos.search.parallel import make_executor
    from qumos.spec import Design

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--result",
        action="append",
        required=True,
        help="a task's result.json of qumos experiment; twice or more: the same experiment "
        "on disjoint held-out seeds, pooled",
    )
    ap.add_argument("--fraction", type=float, help="the setting (default: the first)")
    ap.add_argument("--rows", default="engine (PPO)", help="comma-separated table rows")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", help="default results/reported-attack/TASK-FRACTION[-pooled]")
    args = ap.parse_args()
    if args.workers < 1:
        ap.error(f"--workers: {args.workers}; allowed: 1 or more")

    paths = [Path(p) for p in args.result]
    for p in paths:
        if not p.is_file():
            ap.error(f"--result: {p} is not a file")
    if len(paths) > 1:
        from qumos.search.pooled import load_run, same_experiment

        try:
            same_experiment([load_run(p, args.fraction) for p in paths])
        except ValueError as e:
            ap.error(f"--result: {e}")
    result_path = paths[0]
    res = json.loads(result_path.read_text())
    settings = res["settings"]
    if args.fraction is None:
        setting = settings[0]
    else:
        match = [s for s in settings if abs(s["fraction"] - args.fraction) < 1e-12]
        if not match:
            ap.error(
                f"--fraction: {args.fraction}; this result has "
                f"{', '.join(str(s['fraction']) for s in settings)}"
            )
        setting = match[0]
    rows = {r["method"]: r for r in setting["rows"]}
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in rows]
    if unknown:
        ap.error(f"--rows: {unknown} not in this setting; rows: {sorted(rows)}")
    frac = setting["fraction"]
    lam = res["config"]["lam"]
    ec = res["eval_config"]
    ecfg = EvalConfig(**{**ec, "seeds": tuple(ec["seeds"]), "strategies": tuple(ec["strategies"])})
    # one run per result.json: its held-out seeds, its budgets, its experiment's cache
    runs = []
    for p in paths:
        held = tuple(json.loads(p.read_text())["config"]["heldout_seeds"])
        base_p = ecfg.with_(attack_fraction=frac, seeds=held)
        runs.append(
            (
                held,
                {
                    "default": base_p,
                    "2x steps": base_p.with_(attack_epochs=2 * base_p.attack_epochs),
                    "2x restarts": base_p.with_(attack_restarts=2 * base_p.attack_restarts),
                },
                EvalCache(p.parent / "cache.jsonl"),
            )
        )
    heldout = tuple(s for held, _, _ in runs for s in held)
    base = runs[0][1]["default"]
    budget_names = list(runs[0][1])
    suffix = "-pooled" if len(paths) > 1 else ""
    out = Path(args.out or ROOT / "results" / "reported-attack" / f"{res['task']}-{frac:g}{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    # the default figures are the experiment's own records (its cache); never recomputed
    exp_cache = runs[0][2]
    # the experiment's held-out records (at the default budget) by design key; a row names
    # its designs by key, or (result.json files written before keys) by short form, which
    # omits the entanglement
    by_key: dict[str, Design] = {}
    by_short: dict[str, dict[str, Design]] = {}
    for r in exp_cache.records.values():
        if r["fingerprint"] == base.fingerprint():
            d = Design.model_validate(r["design"])
            by_key[r["key"]] = d
            by_short.setdefault(r["short"], {})[r["key"]] = d
    designs: dict[str, dict[int | str, Design]] = {}
    for label in wanted:
        row = rows[label]
        if "keys" in row:
            missing = sorted(k for k in row["keys"].values() if k not in by_key)
            if missing:
                ap.error(f"--result: the experiment's cache lacks the held-out record of {missing}")
            designs[label] = {_entry(s): by_key[k] for s, k in row["keys"].items()}
            continue
        shorts = set(row["designs"].values())
        missing = sorted(shorts - set(by_short))
        if missing:
            ap.error(f"--result: the experiment's cache lacks the held-out record of {missing}")
        twice = sorted(sh for sh in shorts if len(by_short[sh]) > 1)
        if twice:
            ap.error(
                f"--result: row {label!r} names {twice}, several designs (entanglements) in "
                "the cache; rerun the experiment's command (it resumes from its cache) to "
                "write design keys into result.json"
            )
        designs[label] = {
            _entry(s): next(iter(by_short[sh].values())) for s, sh in row["designs"].items()
        }
    unique = {d.key(): d for per in designs.values() for d in per.values()}
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    cache = EvalCache(out / "cache.jsonl")
    executor = make_executor(args.workers)
    per_run: list[dict[str, dict[str, dict]]] = []
    for held, budgets, run_cache in runs:
        got_run: dict[str, dict[str, dict]] = {}
        for bname, cfg in budgets.items():
            if bname == "default":
                got_run[bname] = {}
                for k, d in unique.items():
                    rec = run_cache.get(d, cfg)
                    if rec is None:
                        ap.error(f"--result: a run lacks the held-out record of {d.short()}")
                    got_run[bname][k] = rec
                continue
            ev = Evaluator(cfg, lam, cache, executor, on_record=_progress(bname))
            todo = [d for d in unique.values() if cache.get(d, cfg) is None]
            print(
                f"{bname}: {len(todo)} of {len(unique)} designs to evaluate on seeds {list(held)}",
                flush=True,
            )
            got = ev.evaluate_many(list(unique.values()))
            got_run[bname] = {r["key"]: r for r in got}
        per_run.append(got_run)
    recs = {b: {k: _pooled([g[b][k] for g in per_run]) for k in unique} for b in budget_names}
    table = render(designs, recs, lam, budget_names)
    print(table)
    (out / "README.md").write_text(
        f"# {res['task']}, labelled fraction {frac:g}: the reported designs under a stronger "
        "attacker\n\n"
        "Command: `python bench/bench_reported_attack.py "
        + " ".join(f"--result {p}" for p in paths)
        + " --fraction "
        f'{frac:g} --rows "{args.rows}" --workers {args.workers}'
        + (f" --out {args.out}" if args.out else "")
        + "`\n\n"
        f"Held-out seeds {list(heldout)}"
        + (" (pooled over the runs)" if len(paths) > 1 else "")
        + f"; default attacker {base.attack_epochs} steps x "
        f"{base.attack_restarts} restarts per strategy (profile {base.attack_profile}); "
        f"load average at start {load[0]:.2f}.\n\n" + table + "\n"
    )


def _pooled(recs: list[dict]) -> dict:
    """One design's records of one budget: itself, or pooled over disjoint seed sets."""
    from qumos.search.evaluator import pool_records

    return recs[0] if len(recs) == 1 else pool_records(recs)


def _entry(s: str) -> int | str:
    """A row's entry: a search seed, or "seed:offset" for a row of several designs per seed."""
    return int(s) if s.lstrip("-").isdigit() else s


def _entry_text(s: int | str) -> str:
    from qumos.search.report import entry_seed

    if isinstance(s, int):
        return f"search seed {s}"
    off = s.split(":")[1]
    return f"search seed {entry_seed(s)}, median" + ("" if off == "+0" else f" {off}")


def _progress(budget: str):
    def show(rec: dict, fresh: bool) -> None:
        print(
            f"  {budget}: {rec['short']} security {rec['security'][0]:.3f} "
            f"({rec['seconds']:.0f} s)",
            flush=True,
        )

    return show


def render(designs: dict, recs: dict, lam: float, budgets: list[str]) -> str:
    from qumos.search.evaluator import reward
    from qumos.search.pooled import margins
    from qumos.search.report import cell_text, mean_std

    lines = [
        "| row | figure | " + " | ".join(budgets) + " | largest drop |",
        "|---|---|" + "---|" * (len(budgets) + 1),
    ]
    worst: float | None = None
    for label, per in designs.items():
        for name, get in (
            ("security", lambda r: r["security"][0]),
            ("reward", lambda r: reward(r, lam)),
            ("accuracy", lambda r: r["victim_acc"][0]),
            # both sides of the leak: the best theft, and the best free reference S
            # (trained with the same budget, so it gains from the budget too)
            ("worst attacker accuracy (max_j A_j)", lambda r: r["worst_attacker_acc"][0]),
            ("S (best no-theft reference)", lambda r: r["S"][0]),
        ):
            vals = [mean_std([get(recs[b][d.key()]) for d in per.values()]) for b in budgets]
            drop = max(vals[0][0] - v[0] for v in vals[1:])
            if name == "security":
                worst = drop if worst is None else max(worst, drop)
            lines.append(
                f"| {label} | {name} | "
                + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in vals)
                + f" | {drop:+.3f} |"
            )
        for s, d in sorted(per.items()):
            sec = [recs[b][d.key()]["security"][0] for b in budgets]
            lines.append(
                f"| {label}, {_entry_text(s)}: `{cell_text(d.short())}` | security | "
                + " | ".join(f"{x:.3f}" for x in sec)
                + f" | {sec[0] - min(sec[1:]):+.3f} |"
            )
    # the first target's clauses under each budget: the engine above each baseline row by
    # more than the spread (the sum of the two stds over search seeds)
    per_budget = [
        margins(
            [
                {
                    "method": label,
                    "security": list(
                        mean_std([recs[b][d.key()]["security"][0] for d in per.values()])
                    ),
                }
                for label, per in designs.items()
            ]
        )
        for b in budgets
    ]
    for base_row in per_budget[0]:
        lines.append(
            f"| engine - {base_row} | security above it (spread) | "
            + " | ".join(
                f"{m[base_row][0]:.3f} ({m[base_row][1]:.3f}, "
                + ("beyond" if m[base_row][0] > m[base_row][1] else "INSIDE")
                + ")"
                for m in per_budget
            )
            + " | |"
        )
    lines += [
        "",
        f"Largest drop of a row's mean held-out security under the stronger budgets: "
        f"{worst:+.3f} ({'holds' if worst <= TOLERANCE else 'does NOT hold'} within "
        f"{TOLERANCE}). Mean ± population std over search seeds (as the experiment's tables); each figure a mean over the held-out seeds.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
