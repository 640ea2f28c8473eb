"""The experiment's tables: one row per method from held-out records, the issue's target
checks, the all-in-one centralized deployment, and `results/…/README.md`."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from qumos.search.evaluator import old_reward, reward

ENGINE = "ppo"  # the method the targets are checked for
VALUE_GAP_MIN = 0.15
CENTRALIZED_K1 = "centralized search (K=1, lambda=0)"
ALL_IN_ONE = "centralized, {k}-fragment architectures on one provider (lambda=0)"
MEDIAN_RANDOM = "random (median design)"
MIDDLE_RANDOM = re.compile(r"random \(middle (\d+) designs\)")


def entry_seed(entry: int | str) -> int:
    """The search seed of a row's entry: a seed, or "seed:offset" in the middle row."""
    return int(str(entry).split(":")[0])


def middle_label(n: int) -> str:
    """The row of the random searches' `n` designs around the median (`MIDDLE_RANDOM`)."""
    return f"random (middle {n} designs)"


def all_in_one(rec: dict) -> dict:
    """A held-out record of a K-fragment design, as deployed all on one provider: a
    breach of it is a full theft (the thief's model is the victim's: A = acc_victim per
    seed), so its leak is 1 wherever acc_victim > S and the security 0; S is the measured
    best no-theft reference. Accuracy and S are the measured ones."""
    from qumos.attack.report import leak_value

    per_seed = []
    for r in rec["per_seed"]:
        a = r["victim_acc"]
        leak = leak_value(a, r["S"], a)
        per_seed.append(
            {
                **r,
                "attacker_acc": [a],
                "leak": [leak],
                "security": 1.0 - leak,
                "gain": max(0.0, a - r["S"]),
                "gain_scratch": a - r["scratch"],
                "theft_ratio": 1.0,
            }
        )
    out = dict(rec, per_seed=per_seed, deployment="one provider")
    for k, f in (
        ("worst_attacker_acc", "victim_acc"),
        ("worst_gain", "gain"),
        ("old_gain", "gain_scratch"),
        ("theft_ratio", "theft_ratio"),
        ("security", "security"),
    ):
        out[k] = mean_std([r[f] for r in per_seed])
    out["attacker_acc"] = [out["worst_attacker_acc"]]
    return out


def method_label(m: str) -> str:
    return {
        "random": "random (best by reward)",
        "evolution": "regularized evolution",
        "ppo": "engine (PPO)",
        "ppo-seq": "engine (PPO, sequential)",
        "ppo-warm": "engine (PPO, warm-started)",
    }[m]


def mean_std(values: list[float]) -> list[float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return [None, None]
    return [statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0]


def table_row(
    label: str,
    held: dict[int, dict] | dict[int | str, dict],
    in_search: dict[int, float] | None,
    lam: float,
) -> dict:
    """Mean ± std over search seeds of the held-out figures of each seed's final design;
    over designs for a row of several designs per seed (keys "seed:offset")."""
    recs = list(held.values())
    return {
        "method": label,
        "designs": {str(s): r["short"] for s, r in held.items()},
        # the short form omits the entanglement; the key names the design exactly
        "keys": {str(s): r["key"] for s, r in held.items()},
        "reward": mean_std([reward(r, lam) for r in recs]),
        "old_reward": mean_std([old_reward(r, lam) for r in recs]),
        "accuracy": mean_std([r["victim_acc"][0] for r in recs]),
        "security": mean_std([r["security"][0] for r in recs]),
        "theft_ratio": mean_std([r["theft_ratio"][0] for r in recs]),
        "worst_attacker_acc": mean_std([r["worst_attacker_acc"][0] for r in recs]),
        "S": mean_std([r["S"][0] for r in recs]),
        "eval_seed_std_security": mean_std([r["security"][1] for r in recs])[0],
        "in_search_reward": mean_std(list(in_search.values())) if in_search else [None, None],
        "search_seeds": sorted({entry_seed(s) for s in held}),
    }


SECURE_MIN = 0.7  # the first target's security bar
ACCURATE_WITHIN = 0.03  # ... and its accuracy bar, below the centralized search's


def median_in_search(recs: list[dict], acc_centralized: float | None = None) -> dict:
    """The random searches' designs as evaluated in-search: the median design's figures and
    the share of designs that already clear the first target's bars (security >= SECURE_MIN;
    and accuracy within ACCURATE_WITHIN of `acc_centralized`): how much a search has to
    find. `target_checks` holds the engine's design to the same bars."""
    if not recs:
        return {}

    def med(k: str) -> float:
        return statistics.median(r[k][0] for r in recs)

    secure = [r["security"][0] >= SECURE_MIN for r in recs]
    out = {
        "designs": len(recs),
        "reward": statistics.median(r["reward"] for r in recs),
        "accuracy": med("victim_acc"),
        "security": med("security"),
        "share_secure": statistics.fmean(secure),
    }
    if acc_centralized is not None:
        out["share_secure_and_accurate"] = statistics.fmean(
            s and r["victim_acc"][0] >= acc_centralized - ACCURATE_WITHIN
            for s, r in zip(secure, recs)
        )
    return out


def _shares(med: dict, n_seeds: int = 1) -> str:
    if "share_secure" not in med:  # a result.json written before the shares were counted
        return ""
    text = f" Random designs with security >= {SECURE_MIN}: {med['share_secure']:.0%}"
    if "share_secure_and_accurate" in med:
        text += (
            f"; and within {ACCURATE_WITHIN} of the centralized accuracy as well: "
            f"{med['share_secure_and_accurate']:.0%}"
        )
    each = (
        "one evaluation seed each"
        if n_seeds == 1
        else f"each the mean of {n_seeds} evaluation seeds"
    )
    return text + f" (in-search, {each})."


def _apart(a: list, b: list) -> bool:
    """a's mean above b's by more than the spread (the sum of the two stds)."""
    return a[0] - b[0] > (a[1] or 0.0) + (b[1] or 0.0)


def target_checks(rows: list[dict], value_gap: float) -> dict:
    """The issue's targets for the engine (PPO) on held-out seeds."""
    by = {r["method"]: r for r in rows}
    cen = max(
        (r for r in rows if r["method"].startswith("centralized")), key=lambda r: r["accuracy"][0]
    )
    split = next(r for r in rows if r["method"].startswith("even split"))
    eng = by.get(method_label(ENGINE))
    out: dict = {"value_gap": value_gap, "carries_comparison": value_gap >= VALUE_GAP_MIN}
    if eng is None:
        return out
    out.update(
        {
            "engine_security_ge_0.7": eng["security"][0] >= SECURE_MIN,
            "engine_accuracy_gap_to_centralized": cen["accuracy"][0] - eng["accuracy"][0],
            "engine_within_0.03_of_centralized": cen["accuracy"][0] - eng["accuracy"][0]
            <= ACCURATE_WITHIN,
            "even_split_security_lower_beyond_spread": _apart(eng["security"], split["security"]),
        }
    )
    med = by.get(MEDIAN_RANDOM)
    if med:
        out["median_random_security_lower_beyond_spread"] = _apart(eng["security"], med["security"])
    mid = next((r for r in rows if MIDDLE_RANDOM.fullmatch(r["method"])), None)
    if mid:
        # the same clause against the designs around the median (spread over designs)
        out["middle_random_security_lower_beyond_spread"] = _apart(eng["security"], mid["security"])
    rnd = by.get(method_label("random"))
    if rnd:
        out["engine_reward_minus_random"] = eng["reward"][0] - rnd["reward"][0]
        out["engine_reward_above_random"] = eng["reward"][0] > rnd["reward"][0]
        out["engine_vs_random_inside_spread"] = not (
            _apart(eng["reward"], rnd["reward"]) or _apart(rnd["reward"], eng["reward"])
        )
    return out


def _f(v) -> str:
    if v is None or v[0] is None:
        return "-"
    return f"{v[0]:.3f}" if v[1] is None else f"{v[0]:.3f} ± {v[1]:.3f}"


def cell_text(text: str) -> str:
    """`text` inside a markdown table cell (its pipes escaped)."""
    return text.replace("|", "\\|")


def profile_label(e: dict) -> str:
    """The attacker profile of an eval_config, with its coalition if any."""
    names, size = e.get("attack_coalition") or (), e.get("attack_coalition_size") or 0
    if size:
        return f"`{e['attack_profile']}` (every coalition of up to {size} providers)"
    if names:
        return f"`{e['attack_profile']}` ({'+'.join(names)})"
    return f"`{e['attack_profile']}`"


def labelled_label(per_class: list[int] | None) -> str:
    """' (4 labelled images, 1 per class)' for a setting's heading ('' when unknown)."""
    if not per_class:
        return ""
    each = (
        f"{per_class[0]} per class"
        if len(set(per_class)) == 1
        else f"{', '.join(map(str, per_class))} per class"
    )
    return f" ({sum(per_class)} labelled images, {each})"


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| method | final design per search seed | held-out reward | accuracy | security "
        "| theft ratio | worst attacker acc | in-search reward | old reward |\n|" + "---|" * 9
    )
    lines = [head]
    for r in rows:
        # a design's `|glue|head` would end the table cell: GFM reads `\|` as a pipe
        designs = "<br>".join(f"{s}: `{cell_text(d)}`" for s, d in r["designs"].items())
        lines.append(
            "| "
            + " | ".join(
                [
                    r["method"],
                    designs,
                    _f(r["reward"]),
                    _f(r["accuracy"]),
                    _f(r["security"]),
                    _f(r["theft_ratio"]),
                    _f(r["worst_attacker_acc"]),
                    _f(r["in_search_reward"]),
                    _f(r["old_reward"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _run_of(command: str) -> str:
    """A command without its --workers (how many processes share the work: the figures
    do not depend on it)."""
    return " ".join(re.sub(r"\s--workers(=|\s+)\S+", "", " " + command).split())


def write_report(out: Path, command: str | None = None) -> Path:
    """results/…/README.md from every `<task>/result.json` under `out`."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    commands = []
    cmd_file = out / "commands.txt"
    known = cmd_file.read_text().splitlines() if cmd_file.is_file() else []
    # a resumed run (perhaps with another --workers: same figures) adds no second copy
    if command and _run_of(command) not in {_run_of(c) for c in known}:
        with cmd_file.open("a") as f:
            f.write(command + "\n")
    if cmd_file.is_file():
        runs = {_run_of(c): c for c in cmd_file.read_text().splitlines() if c.strip()}
        commands = list(runs.values())  # the latest spelling of each run
    parts = [
        "# Security engine experiment: held-out figures over search seeds\n",
        "Commands (from the repository root; each resumes from the caches):\n\n```bash\n"
        + "\n".join(commands)
        + "\n```\n",
        "Every figure is the mean ± population std over search seeds of the held-out "
        "evaluation (seeds never used while searching) of each search seed's final "
        "design; each held-out figure is itself a mean over the held-out evaluation "
        "seeds. reward = acc - lambda * max(0, max_j (A_j - S)) with S the profile's "
        "best no-theft reference; old reward = acc - lambda * max_j (A_j - scratch) "
        "(the formula before threat model v2); security = 1 - max_j clip((A_j - S) / "
        "(acc - S), 0, 1); theft ratio = max_j A_j / acc. In-search reward: the "
        "winner's reward on the search's own seeds (biased upwards: it selected the "
        "design). The row random (middle N designs) is the exception: its figures are over "
        "designs, the N around each random search's median by in-search reward (entries "
        "seed:offset; offset 0 is the median design), so its spread is the spread of the "
        "designs a random search draws near its median.\n",
    ]
    for res in results:
        c, e = res["config"], res["eval_config"]
        parts.append(
            f"## {res['task']}\n\nSearch: {c['max_evals']} distinct designs per "
            f"search, search seeds {c['search_seeds']}, evaluation seeds "
            f"{e['seeds']} while searching, held-out seeds {c['heldout_seeds']}; "
            f"profile {profile_label(e)}, {e['attack_restarts']} restarts x "
            f"{e['attack_epochs']} steps; victim {e['victim_epochs']} epochs; "
            f"lambda {c['lam']}; K = {c['n_fragments']}. Throughput: "
            f"{_num(res.get('designs_per_hour_per_core'))} designs per hour per "
            f"core (load average {_num(res['load_average'][0])}).\n"
        )
        for st in res["settings"]:
            ch = st["checks"]
            parts.append(
                f"### attacker's labelled fraction {st['fraction']:g}"
                + labelled_label(st.get("labelled_per_class"))
                + "\n\n"
                f"Value gap acc_centralized - S = **{st['value_gap']:.3f}** (acc_centralized: "
                f"{st.get('centralized_compared', CENTRALIZED_K1)}; S = "
                f"{_f(st['S'])}, {', '.join(st['S_reference'])}; the most accurate final "
                f"design's accuracy - S = {st.get('best_accuracy_minus_S', float('nan')):.3f}): "
                + (
                    "carries the comparison.\n\n"
                    if ch["carries_comparison"]
                    else f"below {VALUE_GAP_MIN}, so most designs look secure here and the "
                    "comparison says little.\n\n"
                )
                + markdown_table(st["rows"])
                + "\n\n"
                + (
                    f"Median random design (in-search, {st['random_median_in_search']['designs']}"
                    f" designs): reward {st['random_median_in_search']['reward']:.3f}, "
                    f"accuracy {st['random_median_in_search']['accuracy']:.3f}, security "
                    f"{st['random_median_in_search']['security']:.3f}."
                    + _shares(st["random_median_in_search"], len(e["seeds"]))
                    + "\n\n"
                    if st["random_median_in_search"]
                    else ""
                )
                + f"![Pareto plot]({res['task']}/{st['pareto']})\n\n"
                f"Target checks: `{json.dumps(ch)}`\n"
            )
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path


def _num(v) -> str:
    return "-" if v is None else f"{v:.1f}"
