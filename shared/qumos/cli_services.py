"""`qumos deploy`, `qumos up` and `qumos demo`: the services on this machine, no Docker.

    qumos up                      three providers (8101-8103) + orchestrator (8100), the
                                  default model deployed; Ctrl-C stops everything
    qumos demo [--json]           up, predict the digits-4 test set over HTTP, compare with
                                  the in-process torch model, report latency, shut down
    qumos deploy ARTIFACT --orchestrator URL --admin-token-file F \
        --provider provider-a=URL ... --tokens-dir D
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import typer
from qumos.cli_common import DEFAULT_ARTIFACT, attack_progress, console, emit, fail, progress_bar
from qumos.errors import QumosError

commands = typer.Typer()  # added to the `qumos` app by qumos.cli

DEFAULT_WORKDIR = Path("runs/local")
# options that `up` and `demo` share
WORKDIR = typer.Option(DEFAULT_WORKDIR, help="data dirs, secrets and logs")
PORT = typer.Option(8100, help="orchestrator port; providers use the next ones")
EPOCHS = typer.Option(30, min=1, help="training epochs if the model is missing")


def _sigterm_as_interrupt() -> None:
    """SIGTERM stops us like Ctrl-C does, so the stack's `finally` shuts services down."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def ensure_default_artifact(path: Path, epochs: int = 30, seed: int = 0):
    """Load the artifact at `path`, or train the default design (digits-4, 2-2-2
    rxyz_cnot) there first, exactly as `qumos train` does."""
    from qumos.artifact import load_artifact, save_artifact
    from qumos.datasets import load_task
    from qumos.spec import design_from_flags
    from qumos.train import TrainConfig, train_design

    if (path / "model.json").is_file():
        return load_artifact(path), False
    design = design_from_flags(dataset="digits", task=4, fragments="2-2-2")
    data = load_task(design.dataset, design.task, seed=seed)
    cfg = TrainConfig(epochs=epochs, seed=seed)
    with progress_bar() as bar:
        tid = bar.add_task(f"train {design.short()}", total=epochs, info="")
        spec, res, test_acc = train_design(
            design,
            data,
            cfg,
            name="qumos-model",
            progress=lambda e, n, v: bar.update(tid, completed=e, info=f"val {v:.3f}"),
        )
    save_artifact(
        spec,
        path,
        metrics={
            "val_acc": res.val_acc,
            "test_acc": test_acc,
            "train_acc": res.train_acc,
            "best_epoch": res.best_epoch,
            "train_seconds": res.seconds,
        },
        training={
            "design": design.model_dump(),
            "seed": seed,
            "epochs": epochs,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
        },
    )
    return load_artifact(path), True


def run_security_report(
    stack,
    artifact,
    seeds: tuple[int, ...] = (0, 1),
    epochs: int | None = None,
    restarts: int | None = None,
    queries: int = 100,
    profiles: tuple[str, ...] = ("breach", "breach+queries"),
) -> dict:
    """Breach each provider of the running `stack` in turn, once per profile, with the one
    attack driver (`qumos.attack.run_attack`).

    The attacker reads that provider's data directory and nothing else (its fragment and
    the real `access.jsonl`), knows the design (Kerckhoffs) and holds 5% of the labelled
    training split; under `breach+queries` it also sends `queries` of its own images
    through the orchestrator's public API, one per request, and attributes their rows in
    the breached provider's log by timing and content (`qumos.attack.live`). The harness
    scores thefts against the victim's answers on the test split, taken through the same
    public API. Returns {profile: report dict with its markdown table under "table"}."""
    from qumos.attack import AttackConfig, Victim, breach, report_table, run_attack
    from qumos.attack.context import strip
    from qumos.attack.live import HttpOracle
    from qumos.client import make_client, predict
    from qumos.datasets import load_task
    from qumos.spec import design_of

    spec = artifact.spec
    data = load_task(spec.dataset, spec.task, seed=int(artifact.training.get("seed", 0)))
    with make_client(timeout=120) as client:  # the harness: the victim's test answers
        labels = np.concatenate(
            [
                predict(
                    client,
                    stack.orchestrator_url,
                    spec.name,
                    data.test.raw[i : i + 64],
                    api_key=stack.client_key,
                ).predictions
                for i in range(0, len(data.test.raw), 64)
            ]
        )
    dirs = {j: stack.data_dir(p) for j, p in enumerate(spec.placement)}
    out = {}
    for profile in profiles:
        cfg = AttackConfig(profile=profile, queries=queries)
        if epochs is not None:
            cfg.epochs = epochs
        if restarts is not None:
            cfg.restarts = restarts
        victim = Victim(
            model=spec.name,
            providers=list(spec.placement),
            acc=float((labels == data.test.y).mean()),
            test_labels=labels,
            arch=strip(spec),
            oracle=HttpOracle(
                stack.orchestrator_url,
                spec.name,
                dirs,
                api_key=stack.create_key(f"attacker-{profile}".replace("+", "-")),
                hidden_inputs=spec.input_transform is not None,
            ),
        )
        holdings = [breach(dirs[j]) for j in range(spec.n_fragments)]
        with progress_bar() as bar:
            tid = bar.add_task(f"attack ({profile})", total=len(seeds), info="")

            prog = attack_progress(bar, tid)
            rep = run_attack(cfg, data, victim, holdings, list(seeds), progress=prog)
        rep.design = design_of(spec).short()
        d = rep.to_dict()
        d["table"] = report_table(d)
        out[profile] = d
    return out


@commands.command()
def deploy(
    artifact: Path = typer.Argument(DEFAULT_ARTIFACT, help="artifact directory"),
    orchestrator: str = typer.Option("http://127.0.0.1:8100", help="orchestrator URL"),
    admin_token_file: Path = typer.Option(
        DEFAULT_WORKDIR / "secrets/admin_token", help="file with the orchestrator's admin token"
    ),
    provider: list[str] = typer.Option(
        [], help="name=url per provider (repeatable); default provider-a..c on 8101-8103"
    ),
    tokens_dir: Path = typer.Option(
        DEFAULT_WORKDIR / "secrets/tokens", help="one token file per provider, named after it"
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Push fragment k to provider k and register the company part with the orchestrator."""
    from qumos.artifact import load_artifact
    from qumos.config import parse_providers, read_token_file
    from qumos.deploy import deploy_artifact

    try:
        art = load_artifact(artifact)
        try:
            urls = (
                parse_providers(",".join(provider))
                if provider
                else {n: f"http://127.0.0.1:{8101 + i}" for i, n in enumerate(art.spec.placement)}
            )
        except ValueError as e:
            raise QumosError(f"--provider: {e}") from None
        tokens = {
            name: read_token_file(tokens_dir / name, f"--tokens-dir ({name})")
            for name in art.spec.placement
        }
        admin = read_token_file(admin_token_file, "--admin-token-file")
        result = deploy_artifact(art, orchestrator, admin, urls, tokens)
    except (QumosError, ValueError) as e:
        fail(e)
    except Exception as e:  # httpx transport errors
        fail(QumosError(f"deploy failed: {type(e).__name__}: {e}"))
    emit(
        result,
        as_json,
        "\n".join(f"{d['fragment_id']} -> {d['provider']}" for d in result["fragments"])
        + f"\nregistered {result['model']} at {orchestrator}",
    )


@commands.command()
def up(
    artifact: Path = typer.Option(DEFAULT_ARTIFACT, help="model to deploy (trained if missing)"),
    workdir: Path = WORKDIR,
    port: int = PORT,
    epochs: int = EPOCHS,
    no_deploy: bool = typer.Option(False, "--no-deploy", help="start the services only"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Start three providers and the orchestrator on loopback, deploy, serve until Ctrl-C."""
    from qumos.localstack import LocalStack

    _sigterm_as_interrupt()
    stack = LocalStack(workdir=workdir, orchestrator_port=port)
    try:
        art = None if no_deploy else ensure_default_artifact(artifact, epochs)[0]
        with console.status("starting services (waiting for /readyz)"):
            stack.start()
        if art is not None:
            stack.deploy(art)
        info = stack.describe() | {
            "model": art.spec.name if art else None,
            "client_key_file": str(stack.client_key_file),
        }
        emit(
            info,
            as_json,
            "\n".join(f"{n:13s} {s['url']}  (log {s['log']})" for n, s in info["services"].items())
            + (
                f"\n\ntry: curl -s {stack.orchestrator_url}/v1/models/{art.spec.name}/predict "
                f'-H "Authorization: Bearer $(cat {stack.client_key_file})" -d \'{{"instances": [[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,'
                f"0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,"
                f"0,6,13,10,0,0,0]]}}'"
                if art
                else ""
            )
            + "\n\nCtrl-C stops every service.",
        )
        while all(s.alive() for s in stack.services.values()):
            time.sleep(0.5)
        dead = [n for n, s in stack.services.items() if not s.alive()]
        raise QumosError(
            f"{', '.join(dead)} exited; last lines of its log:\n"
            f"{stack.services[dead[0]].log_tail()}"
        )
    except KeyboardInterrupt:
        console.print("stopping services")
    except QumosError as e:
        stack.stop()
        fail(e)
    finally:
        stack.stop()


def _demo(stack, art, batch: int) -> dict:
    import torch
    from qumos.client import make_client, predict
    from qumos.datasets import load_task
    from qumos.model import DistributedQNN

    seed = int(art.training.get("seed", 0))
    data = load_task(art.spec.dataset, art.spec.task, seed=seed).test
    probs, latencies = [], []
    with make_client(timeout=120) as client, progress_bar() as bar:
        tid = bar.add_task("predict over HTTP", total=len(data.y), info="")
        for i in range(0, len(data.y), batch):
            t0 = time.perf_counter()
            res = predict(
                client,
                stack.orchestrator_url,
                art.spec.name,
                data.raw[i : i + batch],
                api_key=stack.client_key,
            )
            latencies.append(time.perf_counter() - t0)
            probs.append(np.array(res.probabilities))
            bar.update(tid, completed=min(i + batch, len(data.y)))
    p_http = np.concatenate(probs)
    model = DistributedQNN(art.spec, dtype=torch.float64)
    with torch.no_grad():
        p_local = torch.softmax(model(torch.as_tensor(data.x, dtype=torch.float64)), 1).numpy()
    lat = np.array(latencies) * 1000
    return {
        "model": art.spec.name,
        "n_test": len(data.y),
        "batch": batch,
        "accuracy_http": float((p_http.argmax(1) == data.y).mean()),
        "accuracy_in_process": float((p_local.argmax(1) == data.y).mean()),
        "label_agreement": float((p_http.argmax(1) == p_local.argmax(1)).mean()),
        "max_prob_diff": float(np.abs(p_http - p_local).max()),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
        "throughput_samples_per_s": float(len(data.y) / (lat.sum() / 1000)),
    }


@commands.command()
def demo(
    artifact: Path = typer.Option(DEFAULT_ARTIFACT, help="model (trained here if missing)"),
    workdir: Path = WORKDIR,
    port: int = PORT,
    epochs: int = EPOCHS,
    batch: int = typer.Option(32, min=1, max=1024, help="images per predict call"),
    attack: bool = typer.Option(True, help="breach each provider in turn and report"),
    attack_seeds: str = typer.Option("0,1", help="attacker seeds, comma-separated"),
    attack_epochs: int | None = typer.Option(
        None,
        min=1,
        max=2000,
        help="attacker training steps per restart (default: the converged budget)",
    ),
    attack_queries: int = typer.Option(
        100, min=1, max=5000, help="breach+queries: the attacker's own queries"
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train or reuse the default model, start the services, predict the test set over
    HTTP, compare with the in-process model, breach each provider in turn and print the
    security report, and shut everything down."""
    from qumos.localstack import LocalStack

    _sigterm_as_interrupt()
    t0 = time.perf_counter()
    stack = LocalStack(workdir=workdir, orchestrator_port=port)
    try:
        art, trained = ensure_default_artifact(artifact, epochs)
        with console.status("starting 3 providers and the orchestrator"):
            stack.start()
        stack.deploy(art)
        result = {
            "artifact": str(artifact),
            "trained_now": trained,
            "services": {n: s.url for n, s in stack.services.items()},
            **_demo(stack, art, batch),
        }
        if attack:
            try:
                seeds = tuple(int(v) for v in attack_seeds.split(","))
            except ValueError:
                raise QumosError(
                    f"--attack-seeds: {attack_seeds!r} is not a comma-separated list of integers"
                ) from None
            result["security"] = run_security_report(
                stack, art, seeds=seeds, epochs=attack_epochs, queries=attack_queries
            )
    except KeyboardInterrupt:
        stack.stop()
        console.print("interrupted; services stopped")
        raise typer.Exit(130) from None
    except QumosError as e:
        stack.stop()
        fail(e)
    finally:
        stack.stop()
    result["seconds"] = time.perf_counter() - t0
    ok = result["label_agreement"] == 1.0 and result["max_prob_diff"] < 1e-4
    emit(
        result,
        as_json,
        f"model {result['model']}: {result['n_test']} test images predicted over HTTP "
        f"through {', '.join(art.spec.placement)}\n"
        f"  accuracy (HTTP, Aer)        {result['accuracy_http']:.3f}\n"
        f"  accuracy (in-process torch) {result['accuracy_in_process']:.3f}\n"
        f"  label agreement             {result['label_agreement']:.3f}  "
        f"(max |prob diff| {result['max_prob_diff']:.2e})\n"
        f"  latency per batch of {batch}   p50 {result['latency_ms_p50']:.1f} ms, "
        f"p99 {result['latency_ms_p99']:.1f} ms\n"
        f"  services stopped; demo took {result['seconds']:.0f}s"
        + "".join(
            f"\n\nSecurity report, profile {p} (each provider breached in turn):\n{r['table']}"
            for p, r in result.get("security", {}).items()
        ),
    )
    if not ok:
        raise typer.Exit(1)
