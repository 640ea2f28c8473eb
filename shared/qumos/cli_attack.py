"""`qumos attack`: run an attacker profile and print what it rebuilds (qumos.attack).

Three ways to meet the victim:
- `--artifact A` alone: everything in process. Every provider's holdings are computed
  for simulated users' traffic, the public API is the model in process.
- `--provider-dir D` (repeatable): the real data directories of breached providers (their
  fragments and access logs); `--artifact` gives the design (Kerckhoffs) and scores.
- `--orchestrator URL`: the query profiles send their queries to the live public API; the
  insider attributes its rows in the `--provider-dir` logs (timing and content).
"""

from __future__ import annotations

from pathlib import Path

import typer
from qumos.cli_common import attack_progress, emit, fail, parse_coalition, progress_bar
from qumos.errors import AttackError, QumosError

commands = typer.Typer()  # added to the `qumos` app by qumos.cli


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise QumosError(
            f"--seeds: {text!r} is not a comma-separated list of integers such as 0,1,2"
        ) from None
    if not seeds:
        raise QumosError("--seeds: give at least one seed, e.g. 0,1,2")
    if any(s < 0 or s > 2**31 - 1 for s in seeds):
        raise QumosError(f"--seeds: {seeds} has a seed outside 0 to 2147483647")
    return seeds


_FLAGS = {
    "profile",
    "queries",
    "coalition",
    "fraction",
    "epochs",
    "restarts",
    "traffic",
    "strategies",
    "seeds",
}


def _as_flag(e: QumosError) -> QumosError:
    """`field: message` from the library -> `--flag: message` where the field is a flag."""
    field, _, rest = str(e).partition(": ")
    field = "coalition" if field == "coalition_size" else field
    if field in _FLAGS:
        return QumosError(f"--{field}: {rest}")
    return QumosError(str(e))


def parse_names(text: str, flag: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip()) if text else ()
    for n in names:
        if n not in allowed:
            raise QumosError(f"{flag}: unknown {n!r}; allowed: {', '.join(allowed)}")
    return names


@commands.command()
def attack(
    profile: str = typer.Option("breach", help="breach, breach+queries, queries or coalition"),
    queries: int = typer.Option(
        100, help="own images sent through the public API (breach+queries, queries)"
    ),
    coalition: str = typer.Option(
        "",
        help="profile coalition: the providers breached together, e.g. provider-a,provider-c, "
        "or a number m (every coalition of up to m providers in turn, the worst counts)",
    ),
    artifact: Path | None = typer.Option(
        None, help="the victim's artifact: its design (Kerckhoffs) and the scoring"
    ),
    provider_dir: list[Path] = typer.Option(
        [], "--provider-dir", help="a breached provider's data directory (repeatable)"
    ),
    orchestrator: str | None = typer.Option(
        None, help="the public API's URL, for the query profiles against live services"
    ),
    api_key: str | None = typer.Option(
        None, envvar="QUMOS_API_KEY", help="client key for the public API"
    ),
    strategies: str = typer.Option(
        "", help="comma-separated subset of the profile's strategies (default: all)"
    ),
    fraction: float = typer.Option(0.05, help="labelled fraction of the training split"),
    epochs: int = typer.Option(75, help="training steps per restart"),
    restarts: int = typer.Option(
        24, help="restarts per strategy (learning rates cycled), averaged"
    ),
    traffic: int = typer.Option(200, help="in process: users' images in each log"),
    seeds: str = typer.Option("0,1,2", help="comma-separated attack seeds"),
    guess_architecture: bool = typer.Option(
        False, "--guess-architecture", help="the attacker does not know the design"
    ),
    dataset: str = typer.Option("digits", help="the task's dataset (without --artifact)"),
    task: int = typer.Option(4, help="the task, 2 or 4 (without --artifact)"),
    split_seed: int = typer.Option(0, help="the victim's split seed (without --artifact)"),
    data_dir: Path = typer.Option(Path("data"), help="where full MNIST files live"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Run an attacker profile against a victim and print A_j, S, leak and security."""
    import torch
    from qumos.attack import PROFILES, AttackConfig, report_table, strategies_of, summary_json

    torch.set_num_threads(1)
    try:
        if profile not in PROFILES:
            raise QumosError(f"--profile: unknown {profile!r}; allowed: {', '.join(PROFILES)}")
        coalition_names, coalition_size = parse_coalition(coalition, "--coalition")
        cfg = AttackConfig(
            profile=profile,
            queries=queries,
            fraction=fraction,
            epochs=epochs,
            restarts=restarts,
            traffic=traffic,
            know_architecture=not guess_architecture,
            coalition=coalition_names,
            coalition_size=coalition_size,
            strategies=parse_names(strategies, "--strategies", strategies_of(profile)),
        )
        seed_list = parse_seeds(seeds)
        try:
            cfg.validate()
            report = _run(
                cfg,
                artifact,
                provider_dir,
                orchestrator,
                api_key,
                seed_list,
                dataset,
                task,
                split_seed,
                data_dir,
            )
        except AttackError as e:
            raise _as_flag(e) from None
    except QumosError as e:
        fail(e)
        return
    d = report.to_dict()
    emit(summary_json(d), as_json, report_table(d) + f"\n({report.seconds:.0f} s)")


def _run(
    cfg, artifact, provider_dirs, orchestrator, api_key, seeds, dataset, task, split_seed, data_dir
):
    from qumos.attack import Victim, breach, evaluate_in_process, run_attack
    from qumos.datasets import load_task

    art = None
    if artifact is not None:
        from qumos.artifact import load_artifact

        art = load_artifact(artifact)
        dataset, task = art.spec.dataset, art.spec.task
        split_seed = int(art.training.get("seed", split_seed))
    if art is None:
        raise QumosError(
            "--artifact: give the victim's artifact (its design for the "
            "Kerckhoffs attacker, and its accuracy to score the theft)"
        )
    data = load_task(dataset, task, seed=split_seed, data_dir=data_dir)
    cfg.validate(art.spec.n_fragments, list(art.spec.placement))
    with progress_bar() as bar:
        tid = bar.add_task(f"attack {cfg.profile}", total=len(seeds), info="")

        prog = attack_progress(bar, tid)
        if not provider_dirs:
            if orchestrator:
                raise QumosError(
                    "--orchestrator: live queries need the breached provider's "
                    "log to attribute them; give --provider-dir"
                )
            return evaluate_in_process(art.spec, data, cfg, seeds, progress=prog)
        holdings = [breach(p) for p in provider_dirs]
        victim = Victim.in_process(art.spec, data, cfg.know_architecture)
        if orchestrator:
            from qumos.attack.live import HttpOracle

            index = {h.provider: h.fragment(art.spec.name).index for h in holdings}
            victim.oracle = HttpOracle(
                orchestrator,
                art.spec.name,
                {index[h.provider]: p for h, p in zip(holdings, provider_dirs)},
                api_key,
            )
        report = run_attack(cfg, data, victim, holdings, seeds, progress=prog)
    from qumos.spec import design_of

    report.design = design_of(art.spec).short()
    return report
