"""`qumos search` and `qumos experiment`: the security engine's commands."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import typer
from qumos.cli_common import console, emit, fail, parse_coalition, progress_bar
from qumos.errors import QumosError

commands = typer.Typer()  # added to the `qumos` app by qumos.cli


def _seeds(text: str, flag: str = "--seeds") -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise QumosError(f"{flag}: {text!r} is not a comma-separated list of integers") from None
    if not seeds:
        raise QumosError(f"{flag}: give at least one seed, e.g. 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise QumosError(f"{flag}: {text!r} repeats a seed")
    return seeds


def _check_data(tasks: list[tuple[str, int]], data_dir: Path) -> None:
    """Fail before any work when a task's data is missing, naming --tasks."""
    from qumos.datasets import load_task
    from qumos.errors import DatasetError

    for ds, t in tasks:
        try:
            load_task(ds, t, seed=0, data_dir=data_dir)
        except DatasetError as e:
            raise QumosError(f"--tasks: {ds}-{t}: {e}") from None


def _eval_config(
    seeds,
    victim_epochs,
    attack_epochs,
    attack_restarts,
    attack_fraction,
    data_dir,
    attack_profile="breach",
    attack_queries=100,
    attack_coalition="",
    n_providers=3,
):
    from qumos.search.evaluator import EvalConfig, attack_config

    if victim_epochs < 1:
        raise QumosError(f"--victim-epochs: {victim_epochs}; allowed: 1 or more")
    names, size = (), 0
    if attack_coalition or attack_profile == "coalition":
        if attack_profile != "coalition":
            raise QumosError(
                f"--attack-coalition: only --attack-profile coalition takes one "
                f"(profile is {attack_profile})"
            )
        if not attack_coalition:
            raise QumosError(
                "--attack-coalition: --attack-profile coalition needs it: provider names "
                "(provider-a,provider-b) or a number m (every coalition of up to m providers)"
            )
        names, size = parse_coalition(attack_coalition, "--attack-coalition", n_providers)
    cfg = EvalConfig(
        seeds=_seeds(seeds, "--seeds"),
        victim_epochs=victim_epochs,
        attack_epochs=attack_epochs,
        attack_restarts=attack_restarts,
        attack_fraction=attack_fraction,
        attack_profile=attack_profile,
        attack_queries=attack_queries,
        attack_coalition=names,
        attack_coalition_size=size,
        data_dir=str(data_dir),
    )
    try:
        attack_config(cfg)
    except QumosError as e:
        field, _, rest = str(e).partition(": ")
        raise QumosError(f"--attack-{field.replace('_', '-')}: {rest}") from None
    return cfg


def _hiding(text: str) -> tuple[bool, ...]:
    hide = {"off": (False,), "on": (True,), "choose": (False, True)}.get(text)
    if hide is None:
        raise QumosError(f"--hiding: {text!r}; allowed: off, on, choose")
    return hide


def _fragments(text: str) -> int | None:
    if text == "open":
        return None
    if text.isdigit() and 1 <= int(text) <= 4:
        return int(text)
    raise QumosError(
        f"--fragments: {text!r}; allowed: 1 to 4, or 'open' (the engine chooses 2 to 4)"
    )


# Shared option definitions.
SEEDS = typer.Option("0", help="evaluation seeds, comma-separated (split, victim, attacker)")
VICTIM_EPOCHS = typer.Option(10, help="victim training epochs per evaluation")
ATTACK_EPOCHS = typer.Option(
    75, help="attacker training steps per strategy and restart (the converged default)"
)
ATTACK_RESTARTS = typer.Option(
    24, help="attacker restarts per strategy (learning rates cycled; their probabilities averaged)"
)
ATTACK_FRACTION = typer.Option(0.05, help="attacker's share of the labelled training data")
WORKERS = typer.Option(1, help="parallel evaluations (local process pool)")
ROLLOUT = typer.Option(8, help="PPO: designs per policy update")
PROFILE = typer.Option(
    "breach",
    help="attacker profile: breach, breach+queries, queries, coalition (see docs/threat-model.md)",
)
QUERIES = typer.Option(100, help="query profiles: queries the attacker sends")
COALITION = typer.Option(
    "",
    help="profile coalition: the providers breached together (provider-a,provider-b) or a "
    "number m (every coalition of up to m providers in turn, the worst counts)",
)
RAY = typer.Option(None, help="run evaluations on this Ray cluster (e.g. auto, ray://h:10001)")


@commands.command()
def search(
    dataset: str = typer.Option(
        "digits", help="digits, mnist-small, mnist, fashion-mnist, fashion-mnist-small"
    ),
    task: int = typer.Option(4, help="2 = classes {3, 6}; 4 = classes {0, 1, 2, 3}"),
    fragments: str = typer.Option("3", help="number of fragments 1-4, or 'open' (2-4)"),
    max_depth: int = typer.Option(6, help="fragment depths searched: 1 to this (<= 6)"),
    hiding: str = typer.Option("off", help="input hiding: off, on, or choose (the engine decides)"),
    budget_minutes: float | None = typer.Option(None, help="wall-clock budget"),
    max_evals: int | None = typer.Option(None, help="budget in fresh evaluations"),
    lam: float = typer.Option(1.0, "--lambda", help="reward = acc - lambda * max_j (A_j - S)"),
    method: str = typer.Option(
        "ppo",
        help="ppo (the engine), ppo-seq (PPO, one fragment per "
        "step), evolution (regularized evolution) or random",
    ),
    seed: int = typer.Option(0, help="search seed (policy init / random sampling)"),
    seeds: str = SEEDS,
    victim_epochs: int = VICTIM_EPOCHS,
    attack_epochs: int = ATTACK_EPOCHS,
    attack_restarts: int = ATTACK_RESTARTS,
    attack_fraction: float = ATTACK_FRACTION,
    attack_profile: str = PROFILE,
    attack_queries: int = QUERIES,
    attack_coalition: str = COALITION,
    workers: int = WORKERS,
    ray_address: str | None = RAY,
    rollout: int = ROLLOUT,
    data_dir: Path = typer.Option(Path("data")),
    out: Path = typer.Option(Path("runs/search"), help="output directory (resumes its cache)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Search the distributed design with PPO (or a baseline) under a budget."""
    from qumos.search.env import DesignSpace
    from qumos.search.evaluator import EvalCache, Evaluator
    from qumos.search.experiment import METHODS, ExperimentConfig, run_method
    from qumos.search.parallel import make_executor
    from qumos.search.search import Budget, write_search_outputs

    if method not in METHODS:
        fail(QumosError(f"--method: {method!r}; allowed: {', '.join(METHODS)}"))
    try:
        if rollout < 2:
            raise QumosError(f"--rollout: {rollout}; allowed: 2 or more designs per update")
        if budget_minutes is None and max_evals is None:
            budget_minutes = 30.0
        budget = Budget(minutes=budget_minutes, max_evals=max_evals)
        if not 1 <= max_depth <= 6:
            raise QumosError(f"--max-depth: {max_depth}; allowed: 1 to 6")
        k, depths = _fragments(fragments), tuple(range(1, max_depth + 1))
        hide = _hiding(hiding)
        space = (
            DesignSpace.centralized(dataset, task, depths=depths)
            if k == 1
            else DesignSpace(dataset, task, n_fragments=k, depths=depths)
        )
        if hide != (False,):
            from dataclasses import replace

            space = replace(space, hiding=hide)
        ecfg = _eval_config(
            seeds,
            victim_epochs,
            attack_epochs,
            attack_restarts,
            attack_fraction,
            data_dir,
            attack_profile,
            attack_queries,
            attack_coalition,
            2 if k is None else k,  # open: the smallest design has 2 fragments
        )
        if lam == 0 and space.n_fragments == 1:
            ecfg = ecfg.with_(attacks=False)
        if method == "ppo-seq" and space.n_fragments is None:
            raise QumosError("--fragments: open; --method ppo-seq needs a fixed number")
        _check_data([(dataset, task)], data_dir)
    except QumosError as e:
        fail(e)
    t0 = time.perf_counter()
    executor = make_executor(workers, ray_address)
    try:
        with progress_bar(transient=False) as bar:
            tid = bar.add_task(f"{method} {dataset}-{task}", total=max_evals, info="")
            best: list = [float("-inf"), ""]

            def on_record(rec: dict, fresh: bool) -> None:
                from qumos.search.evaluator import reward

                r = reward(rec, lam)
                if r > best[0]:
                    best[:] = [r, rec["short"]]
                bar.update(tid, advance=1, info=f"best {best[0]:.3f} {best[1]}")

            ev = Evaluator(
                ecfg,
                lam=lam,
                cache=EvalCache(out / "cache.jsonl"),
                executor=executor,
                on_record=on_record,
            )
            res = run_method(
                method,
                space,
                ev,
                budget,
                seed,
                ExperimentConfig(rollout=rollout),
                tb_dir=out / "tb",
            )
    except QumosError as e:
        fail(e)
    finally:
        executor.close()
    summary = write_search_outputs(res, out, f"{dataset}-{task}, {method}, lambda={lam}")
    b = res.best
    result = {
        "out": str(out),
        "method": method,
        "best_design": str(out / "best_design.yaml"),
        "best": b["short"],
        "reward": b["reward"],
        "victim_acc": b["victim_acc"][0],
        "worst_leak": (b.get("worst_leak") or [None])[0],
        "evaluations": len(res.records),
        "fresh_evaluations": res.evaluations,
        "steps": res.steps,
        "seconds": time.perf_counter() - t0,
        "policy_mode": summary.get("policy_mode"),
    }
    emit(
        result,
        as_json,
        f"best of {len(res.records)} designs: {b['short']} reward {b['reward']:.3f} "
        f"(accuracy {b['victim_acc'][0]:.3f}"
        + (f", worst leak {b['worst_leak'][0]:.3f}" if b.get("worst_leak") else "")
        + f")\nwritten: {out}/best_design.yaml, designs.jsonl, designs.csv, pareto.png, tb/",
    )


@commands.command()
def experiment(
    tasks: str = typer.Option(
        "digits-4",
        help="comma-separated DATASET-TASK: digits-2, digits-4, "
        "mnist-small-2, mnist-small-4 (mnist-4, fashion-mnist-4, fashion-mnist-small-4 "
        "when their files are in --data-dir; `qumos fetch-data fashion-mnist`)",
    ),
    fractions: str = typer.Option(
        "0.01", help="attacker budgets: labelled fractions, comma-separated (e.g. 0.01,0.05)"
    ),
    gap_fractions: str = typer.Option(
        "", help="attacker budgets measured for the value gap only (no searches), e.g. 0.05"
    ),
    methods: str = typer.Option(
        "random,evolution,ppo", help="searches: random, evolution, ppo, ppo-seq, ppo-warm"
    ),
    warm_start: Path | None = typer.Option(
        None, help="ppo-warm: another task's output directory whose ppo policies start the search"
    ),
    hiding: str = typer.Option(
        "off", help="input hiding in the distributed designs: off, on, or choose (a design field)"
    ),
    search_seeds: str = typer.Option("0,1,2", help="search seeds, one search per method and seed"),
    heldout_seeds: str = typer.Option(
        "100,101,102", help="evaluation seeds of the final designs; disjoint from --seeds"
    ),
    fragments: int = typer.Option(3, help="fragments of the distributed designs (2-4)"),
    max_depth: int = typer.Option(6, help="fragment depths searched: 1 to this (<= 6)"),
    max_evals: int = typer.Option(16, help="distinct designs per search"),
    middle_random: int = typer.Option(
        5,
        help="the random searches' N designs around the median, held out as one more "
        "baseline row (odd; 1: the median design only)",
    ),
    centralized_evals: int = typer.Option(16, help="distinct designs per centralized search"),
    budget_minutes: float | None = typer.Option(None, help="optional wall clock per search"),
    lam: float = typer.Option(1.0, "--lambda"),
    seeds: str = SEEDS,
    victim_epochs: int = VICTIM_EPOCHS,
    attack_epochs: int = ATTACK_EPOCHS,
    attack_restarts: int = ATTACK_RESTARTS,
    attack_profile: str = PROFILE,
    attack_queries: int = QUERIES,
    attack_coalition: str = COALITION,
    workers: int = WORKERS,
    ray_address: str | None = RAY,
    rollout: int = ROLLOUT,
    data_dir: Path = typer.Option(Path("data")),
    out: Path = typer.Option(Path("results/engine"), help="output directory (resumes)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The engine against its baselines: several search seeds, held-out figures, per task
    and attacker budget; a markdown report and Pareto plots. Resumes from its caches."""
    from qumos.search.experiment import (
        ExperimentConfig,
        check_distinct_budgets,
        parse_task,
        run_task,
    )
    from qumos.search.parallel import make_executor
    from qumos.search.report import write_report

    try:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        try:
            fracs = tuple(float(f) for f in fractions.split(",") if f.strip())
            gaps = tuple(float(f) for f in gap_fractions.split(",") if f.strip())
        except ValueError:
            raise QumosError(
                f"--fractions/--gap-fractions: {fractions!r}/{gap_fractions!r} "
                "is not a comma-separated list of numbers"
            ) from None
        if not fracs or any(not 0 < f <= 1 for f in fracs):
            raise QumosError(f"--fractions: {fractions!r}; allowed: numbers in (0, 1]")
        cfg = ExperimentConfig(
            tasks=tuple(names),
            fractions=fracs,
            gap_fractions=gaps,
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
            search_seeds=_seeds(search_seeds, "--search-seeds"),
            heldout_seeds=_seeds(heldout_seeds, "--heldout-seeds"),
            n_fragments=fragments,
            lam=lam,
            max_evals=max_evals,
            centralized_evals=centralized_evals,
            middle_random=middle_random,
            budget_minutes=budget_minutes,
            workers=workers,
            ray_address=ray_address,
            max_depth=max_depth,
            rollout=rollout,
            warm_start=warm_start,
            hiding=_hiding(hiding),
        )
        ecfg = _eval_config(
            seeds,
            victim_epochs,
            attack_epochs,
            attack_restarts,
            fracs[0],
            data_dir,
            attack_profile,
            attack_queries,
            attack_coalition,
            fragments,
        )
        cfg.validate(ecfg)
        _check_data([parse_task(n) for n in names], data_dir)
        check_distinct_budgets(cfg, str(data_dir))
    except QumosError as e:
        fail(e)
    command = "qumos " + shlex.join(sys.argv[1:])
    t0 = time.perf_counter()
    executor = make_executor(workers, ray_address)
    results = []
    try:
        with progress_bar(transient=False) as bar:
            tid = bar.add_task("experiment", total=None, info="")

            def on_record(rec: dict, fresh: bool) -> None:
                bar.update(
                    tid,
                    advance=1,
                    info=f"{rec['short']} acc {rec['victim_acc'][0]:.3f} ({rec['seconds']:.0f} s)",
                )

            for n in names:
                results.append(
                    run_task(
                        n,
                        cfg,
                        ecfg,
                        out / n,
                        executor,
                        log=lambda m: console.print(m),
                        on_record=on_record,
                    )
                )
    except QumosError as e:
        fail(e)
    finally:
        executor.close()
    path = write_report(out, command)
    emit(
        {
            "report": str(path),
            "seconds": time.perf_counter() - t0,
            "tasks": {
                r["task"]: {
                    "designs_per_hour_per_core": r["designs_per_hour_per_core"],
                    "settings": [
                        {
                            "fraction": st["fraction"],
                            "value_gap": st["value_gap"],
                            "checks": st["checks"],
                            "rows": st["rows"],
                        }
                        for st in r["settings"]
                    ],
                }
                for r in results
            },
        },
        as_json,
        f"report: {path}\n"
        + "\n".join(
            f"{r['task']}: {r['designs_per_hour_per_core'] or 0:.0f} designs/hour/core; "
            + "; ".join(
                f"fraction {st['fraction']:g} value gap {st['value_gap']:.3f}"
                for st in r["settings"]
            )
            for r in results
        ),
    )
