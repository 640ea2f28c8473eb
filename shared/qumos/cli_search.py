"""`qumos search` and `qumos experiment`: the security engine's commands."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import typer
from qumos.cli import app, console, emit, fail, progress_bar
from qumos.errors import QumosError


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise QumosError(f"--seeds: {text!r} is not a comma-separated list of integers") from None
    if not seeds:
        raise QumosError("--seeds: give at least one seed, e.g. 0,1,2")
    return seeds


def _eval_config(seeds, victim_epochs, attack_epochs, attack_restarts, attack_fraction,
                 data_dir):
    from qumos.search.evaluator import EvalConfig, attack_config

    if victim_epochs < 1:
        raise QumosError(f"--victim-epochs: {victim_epochs}; allowed: 1 or more")
    cfg = EvalConfig(seeds=_seeds(seeds), victim_epochs=victim_epochs,
                     attack_epochs=attack_epochs, attack_restarts=attack_restarts,
                     attack_fraction=attack_fraction, data_dir=str(data_dir))
    try:
        attack_config(cfg)
    except QumosError as e:
        field, _, rest = str(e).partition(": ")
        raise QumosError(f"--attack-{field.replace('_', '-')}: {rest}") from None
    return cfg


def _fragments(text: str) -> int | None:
    if text == "open":
        return None
    if text.isdigit() and 1 <= int(text) <= 4:
        return int(text)
    raise QumosError(f"--fragments: {text!r}; allowed: 1 to 4, or 'open' (the engine "
                     "chooses 2 to 4)")


# Shared option definitions.
SEEDS = typer.Option("0", help="evaluation seeds, comma-separated (split, victim, attacker)")
VICTIM_EPOCHS = typer.Option(10, help="victim training epochs per evaluation")
ATTACK_EPOCHS = typer.Option(75, help="attacker training steps per strategy and restart "
                             "(the converged default)")
ATTACK_RESTARTS = typer.Option(24, help="attacker restarts per strategy (learning rates "
                               "cycled; their probabilities averaged)")
ATTACK_FRACTION = typer.Option(0.05, help="attacker's share of the labelled training data")
WORKERS = typer.Option(1, help="parallel evaluations (local process pool)")
ROLLOUT = typer.Option(8, help="PPO: designs per policy update")
RAY = typer.Option(None, help="run evaluations on this Ray cluster (e.g. auto, ray://h:10001)")


@app.command()
def search(
    dataset: str = typer.Option("digits", help="digits, mnist-small, mnist, fashion-mnist"),
    task: int = typer.Option(4, help="2 = classes {3, 6}; 4 = classes {0, 1, 2, 3}"),
    fragments: str = typer.Option("3", help="number of fragments 1-4, or 'open' (2-4)"),
    max_depth: int = typer.Option(6, help="fragment depths searched: 1 to this (<= 6)"),
    hiding: str = typer.Option("off", help="input hiding: off, on, or choose (the engine "
                               "decides)"),
    budget_minutes: float | None = typer.Option(None, help="wall-clock budget"),
    max_evals: int | None = typer.Option(None, help="budget in fresh evaluations"),
    lam: float = typer.Option(1.0, "--lambda", help="reward = acc - lambda * max_j (A_j - S)"),
    method: str = typer.Option("ppo", help="ppo (the engine) or random"),
    seed: int = typer.Option(0, help="search seed (policy init / random sampling)"),
    seeds: str = SEEDS, victim_epochs: int = VICTIM_EPOCHS, attack_epochs: int = ATTACK_EPOCHS,
    attack_restarts: int = ATTACK_RESTARTS, attack_fraction: float = ATTACK_FRACTION,
    workers: int = WORKERS, ray_address: str | None = RAY, rollout: int = ROLLOUT,
    data_dir: Path = typer.Option(Path("data")),
    out: Path = typer.Option(Path("runs/search"), help="output directory (resumes its cache)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Search the distributed design with PPO (or random search) under a budget."""
    from qumos.search.env import DesignSpace
    from qumos.search.evaluator import EvalCache, Evaluator
    from qumos.search.parallel import make_executor
    from qumos.search.search import Budget, ppo_search, random_search, write_search_outputs

    if method not in ("ppo", "random"):
        fail(QumosError(f"--method: {method!r}; allowed: ppo, random"))
    try:
        if rollout < 2:
            raise QumosError(f"--rollout: {rollout}; allowed: 2 or more designs per update")
        if budget_minutes is None and max_evals is None:
            budget_minutes = 30.0
        budget = Budget(minutes=budget_minutes, max_evals=max_evals)
        if not 1 <= max_depth <= 6:
            raise QumosError(f"--max-depth: {max_depth}; allowed: 1 to 6")
        k, depths = _fragments(fragments), tuple(range(1, max_depth + 1))
        hide = {"off": (False,), "on": (True,), "choose": (False, True)}.get(hiding)
        if hide is None:
            raise QumosError(f"--hiding: {hiding!r}; allowed: off, on, choose")
        space = (DesignSpace.centralized(dataset, task, depths=depths) if k == 1
                 else DesignSpace(dataset, task, n_fragments=k, depths=depths))
        if hide != (False,):
            from dataclasses import replace

            space = replace(space, hiding=hide)
        ecfg = _eval_config(seeds, victim_epochs, attack_epochs, attack_restarts,
                            attack_fraction, data_dir)
        if lam == 0 and space.n_fragments == 1:
            ecfg = ecfg.with_(attacks=False)
        from qumos.datasets import load_task

        load_task(dataset, task, seed=ecfg.seeds[0], data_dir=data_dir)  # fail early
    except QumosError as e:
        fail(e)
    t0 = time.perf_counter()
    executor = make_executor(workers, ray_address)
    try:
        with progress_bar(transient=False) as bar:
            tid = bar.add_task(f"{method} {dataset}-{task}", total=max_evals, info="")
            best = [float("-inf"), ""]

            def on_record(rec: dict, fresh: bool) -> None:
                from qumos.search.evaluator import reward

                r = reward(rec, lam)
                if r > best[0]:
                    best[:] = [r, rec["short"]]
                bar.update(tid, advance=1, info=f"best {best[0]:.3f} {best[1]}")

            ev = Evaluator(ecfg, lam=lam, cache=EvalCache(out / "cache.jsonl"),
                           executor=executor, on_record=on_record)
            if method == "ppo":
                res = ppo_search(space, ev, budget, seed=seed, tb_dir=out / "tb",
                                 rollout=rollout)
            else:
                res = random_search(space, ev, budget, seed=seed)
    except QumosError as e:
        fail(e)
    finally:
        executor.close()
    summary = write_search_outputs(res, out, f"{dataset}-{task}, {method}, lambda={lam}")
    b = res.best
    result = {"out": str(out), "method": method, "best_design": str(out / "best_design.yaml"),
              "best": b["short"], "reward": b["reward"], "victim_acc": b["victim_acc"][0],
              "worst_leak": (b.get("worst_leak") or [None])[0],
              "evaluations": len(res.records), "fresh_evaluations": res.evaluations,
              "steps": res.steps, "seconds": time.perf_counter() - t0,
              "policy_mode": summary.get("policy_mode")}
    emit(result, as_json,
         f"best of {len(res.records)} designs: {b['short']} reward {b['reward']:.3f} "
         f"(accuracy {b['victim_acc'][0]:.3f}"
         + (f", worst leak {b['worst_leak'][0]:.3f}" if b.get("worst_leak") else "")
         + f")\nwritten: {out}/best_design.yaml, designs.jsonl, designs.csv, pareto.png, tb/")


@app.command()
def experiment(
    tasks: str = typer.Option("digits-2,digits-4,mnist-small-2,mnist-small-4",
                              help="comma-separated DATASET-TASK (add mnist-4, fashion-mnist-4 "
                                   "when their files are in --data-dir)"),
    fragments: int = typer.Option(3, help="fragments of the distributed designs (2-4)"),
    max_depth: int = typer.Option(6, help="fragment depths searched: 1 to this (<= 6)"),
    budget_minutes: float | None = typer.Option(None, help="wall clock per search"),
    max_evals: int | None = typer.Option(None, help="fresh evaluations per search"),
    lam: float = typer.Option(1.0, "--lambda"),
    seed: int = typer.Option(0, help="search seed"),
    seeds: str = SEEDS, victim_epochs: int = VICTIM_EPOCHS, attack_epochs: int = ATTACK_EPOCHS,
    attack_restarts: int = ATTACK_RESTARTS, attack_fraction: float = ATTACK_FRACTION,
    workers: int = WORKERS, ray_address: str | None = RAY, rollout: int = ROLLOUT,
    data_dir: Path = typer.Option(Path("data")),
    out: Path = typer.Option(Path("results/experiment"), help="output directory"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the engine and every baseline per task; write a markdown table and plots."""
    from qumos.search.experiment import ExperimentConfig, parse_task, run_task, write_report
    from qumos.search.parallel import make_executor

    try:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        for n in names:
            parse_task(n)
        if not 1 <= max_depth <= 6:
            raise QumosError(f"--max-depth: {max_depth}; allowed: 1 to 6")
        if not 2 <= fragments <= 4:
            raise QumosError(f"--fragments: {fragments}; allowed: 2 to 4")
        if budget_minutes is None and max_evals is None:
            max_evals = 16
        cfg = ExperimentConfig(tasks=tuple(names), n_fragments=fragments, lam=lam,
                               budget_minutes=budget_minutes, max_evals=max_evals, seed=seed,
                               workers=workers, ray_address=ray_address, max_depth=max_depth,
                               rollout=rollout)
        ecfg = _eval_config(seeds, victim_epochs, attack_epochs, attack_restarts,
                            attack_fraction, data_dir)
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
                bar.update(tid, advance=1, info=f"{rec['short']} acc {rec['victim_acc'][0]:.3f}")

            for n in names:
                results.append(run_task(n, cfg, ecfg, out / n, executor,
                                        log=lambda m: console.print(m), on_record=on_record))
    except QumosError as e:
        fail(e)
    finally:
        executor.close()
    path = write_report(results, cfg, ecfg, out, command, time.perf_counter() - t0)
    emit({"report": str(path), "seconds": time.perf_counter() - t0,
          "tasks": {r["task"]: {"rows": [{k: v for k, v in row.items() if k != "record"}
                                         for row in r["rows"]], "checks": r["checks"]}
                    for r in results}},
         as_json, f"report: {path}")
