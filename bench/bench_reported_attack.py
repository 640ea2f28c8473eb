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

Resumable: the stronger budgets' evaluations are cached in OUT/cache.jsonl; the table
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
    ap.add_argument("--result", required=True, help="a task's result.json of qumos experiment")
    ap.add_argument("--fraction", type=float, help="the setting (default: the first)")
    ap.add_argument("--rows", default="engine (PPO)", help="comma-separated table rows")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", help="default results/reported-attack/TASK-FRACTION")
    args = ap.parse_args()
    if args.workers < 1:
        ap.error(f"--workers: {args.workers}; allowed: 1 or more")

    result_path = Path(args.result)
    if not result_path.is_file():
        ap.error(f"--result: {result_path} is not a file")
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
    heldout = tuple(res["config"]["heldout_seeds"])
    lam = res["config"]["lam"]
    ec = res["eval_config"]
    ecfg = EvalConfig(**{**ec, "seeds": tuple(ec["seeds"]), "strategies": tuple(ec["strategies"])})
    base = ecfg.with_(attack_fraction=frac, seeds=heldout)
    budgets = {
        "default": base,
        "2x steps": base.with_(attack_epochs=2 * base.attack_epochs),
        "2x restarts": base.with_(attack_restarts=2 * base.attack_restarts),
    }
    out = Path(args.out or ROOT / "results" / "reported-attack" / f"{res['task']}-{frac:g}")
    out.mkdir(parents=True, exist_ok=True)
    # the default figures are the experiment's own records (its cache); never recomputed
    exp_cache = EvalCache(result_path.parent / "cache.jsonl")
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
    recs: dict[str, dict[str, dict]] = {
        "default": {k: exp_cache.get(d, base) for k, d in unique.items()}
    }
    for bname, cfg in budgets.items():
        if bname == "default":
            continue
        ev = Evaluator(cfg, lam, cache, executor, on_record=_progress(bname))
        todo = [d for d in unique.values() if cache.get(d, cfg) is None]
        print(
            f"{bname}: {len(todo)} of {len(unique)} designs to evaluate on seeds {list(heldout)}",
            flush=True,
        )
        got = ev.evaluate_many(list(unique.values()))
        recs[bname] = {r["key"]: r for r in got}
    table = render(designs, recs, lam, list(budgets))
    print(table)
    (out / "README.md").write_text(
        f"# {res['task']}, labelled fraction {frac:g}: the reported designs under a stronger "
        "attacker\n\n"
        f"Command: `python bench/bench_reported_attack.py --result {result_path} --fraction "
        f'{frac:g} --rows "{args.rows}" --workers {args.workers}'
        + (f" --out {args.out}" if args.out else "")
        + "`\n\n"
        f"Held-out seeds {list(heldout)}; default attacker {base.attack_epochs} steps x "
        f"{base.attack_restarts} restarts per strategy (profile {base.attack_profile}); "
        f"load average at start {load[0]:.2f}.\n\n" + table + "\n"
    )


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
    lines += [
        "",
        f"Largest drop of a row's mean held-out security under the stronger budgets: "
        f"{worst:+.3f} ({'holds' if worst <= TOLERANCE else 'does NOT hold'} within "
        f"{TOLERANCE}). Mean ± population std over search seeds (as the experiment's tables); each figure a mean over the held-out seeds.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
