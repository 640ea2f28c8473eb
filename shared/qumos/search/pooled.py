"""One experiment's held-out figures over several disjoint sets of held-out seeds.

`qumos experiment` re-evaluates each final design on held-out seeds; rerunning the same
command with `--heldout-seeds` set to another, disjoint set (into a copy of its output,
so the searches replay from the cache) measures the same designs again on fresh seeds.
`pool` checks that the runs are the same experiment on disjoint seeds, joins each
design's held-out records into one record over every seed (`evaluator.pool_records`),
and rebuilds the table rows, the value gap and the target checks from the pooled
records, next to each run's own. `bench/pool_heldout.py` is its driver.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from qumos.search.evaluator import EvalCache, EvalConfig, pool_records
from qumos.search.report import (
    ALL_IN_ONE,
    CENTRALIZED_K1,
    MEDIAN_RANDOM,
    MIDDLE_RANDOM,
    all_in_one,
    method_label,
    table_row,
    target_checks,
)

ENGINE_ROW = method_label("ppo")


@dataclass
class Run:
    """One experiment run: its result.json, the chosen setting and its held-out records
    by design key."""

    path: Path
    result: dict
    setting: dict
    records: dict[str, dict]

    @property
    def heldout(self) -> list[int]:
        return list(self.result["config"]["heldout_seeds"])


def load_run(path: Path, fraction: float | None) -> Run:
    """A result.json and its setting (the first when `fraction` is None) with the held-out
    records of its cache. ValueError names what is missing."""

    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    res = json.loads(path.read_text())
    settings = [s for s in res["settings"] if s.get("rows")]
    if fraction is not None:
        settings = [s for s in settings if abs(s["fraction"] - fraction) < 1e-12]
    if not settings:
        have = ", ".join(f"{s['fraction']:g}" for s in res["settings"] if s.get("rows"))
        raise ValueError(f"{path}: no setting at fraction {fraction}; it has {have}")
    setting = settings[0]
    ec = res["eval_config"]
    ecfg = EvalConfig(**{**ec, "seeds": tuple(ec["seeds"]), "strategies": tuple(ec["strategies"])})
    cfg = ecfg.with_(
        attack_fraction=setting["fraction"], seeds=tuple(res["config"]["heldout_seeds"])
    )
    cache = EvalCache(path.parent / "cache.jsonl")
    records = {r["key"]: r for r in cache.records.values() if r["fingerprint"] == cfg.fingerprint()}
    for row in setting["rows"]:
        if "keys" not in row:
            raise ValueError(
                f"{path}: row {row['method']!r} names no design keys (written before "
                "keys); rerun its command (it resumes from its cache)"
            )
        missing = sorted(k for k in row["keys"].values() if k not in records)
        if missing:
            raise ValueError(f"{path}: the cache lacks the held-out records of {missing}")
    return Run(path, res, setting, records)


def same_experiment(runs: list[Run]) -> None:
    """ValueError unless `runs` are one experiment (task, configuration, fraction, rows and
    their designs) on disjoint sets of held-out seeds."""
    first = runs[0]

    def conf(r: Run) -> dict:
        return {k: v for k, v in r.result["config"].items() if k != "heldout_seeds"}

    seen: set[int] = set()
    for r in runs:
        if r.result["task"] != first.result["task"]:
            raise ValueError(f"{r.path}: task {r.result['task']}, not {first.result['task']}")
        if conf(r) != conf(first) or r.result["eval_config"] != first.result["eval_config"]:
            raise ValueError(
                f"{r.path}: another experiment than {first.path} (its configuration differs "
                "in more than the held-out seeds)"
            )
        if r.setting["fraction"] != first.setting["fraction"]:
            raise ValueError(f"{r.path}: fraction {r.setting['fraction']} differs")
        both = seen & set(r.heldout)
        if both:
            raise ValueError(f"{r.path}: held-out seeds {sorted(both)} used by another run")
        seen |= set(r.heldout)
        for row, row0 in zip(r.setting["rows"], first.setting["rows"]):
            if row["method"] != row0["method"] or row["keys"] != row0["keys"]:
                raise ValueError(
                    f"{r.path}: row {row['method']!r} has other designs than in {first.path}"
                )
        if len(r.setting["rows"]) != len(first.setting["rows"]):
            raise ValueError(f"{r.path}: other rows than {first.path}")


def margins(rows: list[dict]) -> dict[str, list[float]]:
    """For each baseline of the first target: [how much the engine's mean security is
    above it, the spread (the sum of the two stds)]; the clause holds beyond the spread
    when the first is larger."""
    by = {r["method"]: r for r in rows}
    eng = by.get(ENGINE_ROW)
    if eng is None:
        return {}
    out = {}
    for r in rows:
        m = r["method"]
        if m.startswith("even split") or m == MEDIAN_RANDOM or MIDDLE_RANDOM.fullmatch(m):
            out[m] = [
                eng["security"][0] - r["security"][0],
                (eng["security"][1] or 0.0) + (r["security"][1] or 0.0),
            ]
    return out


def pool(runs: list[Run]) -> dict:
    """The pooled setting of `runs` (the same experiment on disjoint held-out seeds):
    rows, value gap, target checks and clause margins, as `run_task` computes them."""
    if len(runs) < 2:
        raise ValueError("pooling needs two runs or more")
    same_experiment(runs)
    first = runs[0]
    lam = first.result["config"]["lam"]
    ceil_label = ALL_IN_ONE.format(k=first.result["config"]["n_fragments"])
    rows, pooled_by_label = [], {}
    for row in first.setting["rows"]:
        label = row["method"]
        held = {s: pool_records([r.records[k] for r in runs]) for s, k in row["keys"].items()}
        if label == ceil_label:
            held = {s: all_in_one(rec) for s, rec in held.items()}
        pooled_by_label[label] = held
        out = table_row(label, held, None, lam)
        out["in_search_reward"] = row["in_search_reward"]  # the searches are the same
        rows.append(out)
    cen = [
        list(pooled_by_label[lab].values())
        for lab in (CENTRALIZED_K1, ceil_label)
        if lab in pooled_by_label
    ]
    cen_rows = max(cen, key=lambda recs: statistics.fmean(r["victim_acc"][0] for r in recs))
    gap = statistics.fmean(r["victim_acc"][0] - r["S"][0] for r in cen_rows)
    return {
        "task": first.result["task"],
        "fraction": first.setting["fraction"],
        "heldout_seeds": [s for r in runs for s in r.heldout],
        "value_gap": gap,
        "rows": rows,
        "checks": target_checks(rows, gap),
        "margins": margins(rows),
        "runs": [
            {
                "result": str(r.path),
                "heldout_seeds": r.heldout,
                "value_gap": r.setting["value_gap"],
                "checks": r.setting["checks"],
                "margins": margins(r.setting["rows"]),
                "security": {x["method"]: x["security"] for x in r.setting["rows"]},
                "reward": {x["method"]: x["reward"] for x in r.setting["rows"]},
            }
            for r in runs
        ],
    }
