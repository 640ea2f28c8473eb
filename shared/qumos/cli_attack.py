"""`qumos attack`: breach one provider's data directory (or, in process, every provider of
an artifact) and measure what the attacker rebuilds. See qumos.attack for the metrics."""

from __future__ import annotations

from pathlib import Path

import typer
from qumos.cli import app, console, emit, fail, progress_bar
from qumos.errors import QumosError


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise QumosError(f"--seeds: {text!r} is not a comma-separated list of integers "
                         "such as 0,1,2") from None
    if not seeds:
        raise QumosError("--seeds: give at least one seed, e.g. 0,1,2")
    return seeds


def parse_strategies(text: str, default: tuple[str, ...]) -> list[str]:
    from qumos.attack import STRATEGIES

    names = [s.strip() for s in text.split(",") if s.strip()] if text else list(default)
    for n in names:
        if n not in STRATEGIES:
            raise QumosError(f"--strategies: unknown strategy {n!r}; allowed: {list(STRATEGIES)}")
    return names


def provider_table(res: dict) -> str:
    """A markdown table of one breached provider's results (`attack_provider`)."""
    def f(v) -> str:
        return "-" if v is None else f"{v:.3f}"
    lines = [f"breached {res['provider']} (fragment {res['index']} of {res['model']}); "
             f"victim accuracy {f(res['victim_acc'])}; seeds {res['seeds']}", "",
             "| strategy | test accuracy | fidelity | own-data accuracy | seconds |",
             "|---|---|---|---|---|"]
    for name, s in res["by_strategy"].items():
        lines.append(f"| {name} | {f(s['acc_mean'])} ± {f(s['acc_std'])} | "
                     f"{f(s['fidelity_mean'])} | {f(s['own_acc_mean'])} | {s['seconds']:.1f} |")
    leak = res.get("leak")
    lines += ["", f"A_j = {f(res['A'][0])} ± {f(res['A'][1])} (best white-box: "
              f"{res.get('best_strategy') or '-'}); S = {f(res['S'][0])} ± {f(res['S'][1])}; "
              f"leak_j = " + (f"{f(leak[0])} ± {f(leak[1])}" if leak else
                              "unknown (no victim accuracy: give --artifact)")]
    return "\n".join(lines)


@app.command()
def attack(
    provider_dir: Path | None = typer.Option(
        None, "--provider-dir", help="the breached provider's data directory"),
    artifact: Path | None = typer.Option(
        None, help="the victim's artifact: its design (Kerckhoffs) and accuracy/fidelity"),
    all_providers: bool = typer.Option(
        False, "--all-providers", help="in process: breach every provider of --artifact"),
    strategies: str = typer.Option(
        "", help="comma-separated; default scratch,substitute,finetune,head_only"),
    fraction: float = typer.Option(0.05, help="labelled fraction of the training set, (0, 1]"),
    epochs: int = typer.Option(30, help="attacker training epochs per restart"),
    restarts: int = typer.Option(3, help="best of R restarts, chosen on the attacker's data"),
    queries: int = typer.Option(500, help="public API queries for the query strategy"),
    seeds: str = typer.Option("0,1,2", help="comma-separated attack seeds"),
    guess_architecture: bool = typer.Option(
        False, "--guess-architecture", help="the attacker does not know the design"),
    dataset: str = typer.Option("digits", help="the task's dataset (the attacker's knowledge)"),
    task: int = typer.Option(4, help="the task (2 or 4)"),
    split_seed: int = typer.Option(0, help="split seed of the task (the victim's)"),
    workers: int = typer.Option(1, min=1, help="--all-providers: worker processes"),
    data_dir: Path = typer.Option(Path("data")),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Breach one provider (--provider-dir) or every provider (--artifact --all-providers),
    rebuild the model with the attack strategies and print accuracy, leak and security."""
    import torch
    from qumos.attack import (
        WHITE_BOX,
        AttackBudget,
        attack_provider,
        breach,
        evaluate_security,
        security_report_table,
        victim_predictor,
    )
    from qumos.datasets import load_task

    torch.set_num_threads(1)
    try:
        budget = AttackBudget(fraction=fraction, epochs=epochs, restarts=restarts,
                              queries=queries, know_architecture=not guess_architecture)
        budget.validate()
        seed_list = parse_seeds(seeds)
        art = None
        if artifact is not None:
            from qumos.artifact import load_artifact

            art = load_artifact(artifact)
            dataset, task = art.spec.dataset, art.spec.task
            split_seed = int(art.training.get("seed", split_seed))
        if all_providers:
            if art is None:
                raise QumosError("--all-providers needs --artifact (the victim model)")
            names = parse_strategies(strategies, WHITE_BOX)
            data = load_task(dataset, task, seed=split_seed, data_dir=data_dir)
            with progress_bar() as bar:
                tid = bar.add_task("attack", total=None, info="")

                def prog(i: dict) -> None:
                    bar.update(tid, total=i.get("total"), completed=i.get("done", 0),
                               info=f"{i.get('strategy')} {i.get('provider') or ''} seed "
                                    f"{i.get('seed')} epoch {i.get('epoch', '-')}")
                rep = evaluate_security(art.spec, data, budget, seed_list, strategies=names,
                                        progress=prog, workers=workers)
            d = rep.to_dict()
            emit(d, as_json, security_report_table(d) + f"\n({rep.seconds:.0f} s)")
            return
        if provider_dir is None:
            raise QumosError("--provider-dir: give the breached provider's data directory "
                             "(or --artifact with --all-providers)")
        holdings = breach(provider_dir)
        names = parse_strategies(strategies, ("scratch",) + WHITE_BOX)
        model = art.spec.name if art else None
        if art is None and budget.know_architecture:
            raise QumosError("--artifact: the Kerckhoffs attacker needs the victim's design; "
                             "give --artifact or --guess-architecture")
        data = load_task(dataset, task, seed=split_seed, data_dir=data_dir)
        vp = victim_predictor(art.spec) if art is not None else None
        if "query" in names and vp is None:
            raise QumosError("--strategies: query needs the victim's answers; give --artifact")
        with progress_bar() as bar:
            tid = bar.add_task(f"attack {holdings.provider}", total=None, info="")

            def prog1(i: dict) -> None:
                bar.update(tid, total=i.get("total"), completed=i.get("done", 0),
                           info=f"{i.get('strategy')} seed {i.get('seed')} "
                                f"epoch {i.get('epoch', '-')}")
            res = attack_provider(holdings, art.spec if art else None, data, budget, seed_list,
                                  strategies=names, victim_predict=vp, model=model,
                                  progress=prog1)
    except QumosError as e:
        fail(e)
        return
    emit(res, as_json, provider_table(res) + f"\n({res['seconds']:.0f} s)")
    console.print(f"access log entries seen: {len(holdings.access_log)}")
