"""The `qumos` command line. Every command takes --json and then prints one JSON object."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from qumos.errors import QumosError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="QuMoS: split a QNN across quantum providers and measure its theft.")
console = Console(stderr=True)

DEFAULT_ARTIFACT = Path("artifacts/default")


def emit(result: dict, as_json: bool, human: str | None = None) -> None:
    """Print the command's result: one JSON object with --json, else readable text."""
    if as_json:
        print(json.dumps(result, default=str))
    elif human:
        Console(soft_wrap=True).print(human, markup=False, highlight=False)


def fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


def progress_bar(transient: bool = True) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
                    TimeElapsedColumn(), console=console, transient=transient)


def load_design_file(path: Path):
    from qumos.spec import validate_design

    import yaml

    if not path.is_file():
        raise QumosError(f"design file {path}: no such file")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise QumosError(f"design file {path}: expected a mapping of design fields")
    return validate_design(data)


@app.command()
def train(
    design_file: Optional[Path] = typer.Argument(None, help="YAML/JSON design file"),
    dataset: str = typer.Option("digits", help="digits, mnist-small, mnist, fashion-mnist"),
    task: int = typer.Option(4, help="2 = classes {3, 6}; 4 = classes {0, 1, 2, 3}"),
    fragments: str = typer.Option("2-2-2", help="depth of each fragment, dash-separated"),
    block: str = typer.Option("rxyz_cnot", help="u3cu3, rxyz_cnot, ry_cz, rzz_ry, rzx_rxx"),
    qubits: int = typer.Option(4, help="qubits per fragment (2 to 10; the first needs >= 4)"),
    entanglement: str = typer.Option("ring", help="ring, linear, full"),
    glue: str = typer.Option("tanh", help="tanh: pi*tanh(Wh+b); sin: pi*sin(Wh+b)"),
    head: str = typer.Option("readout", help="readout (fixed) or linear (trained)"),
    reupload: bool = typer.Option(False, help="glue also feeds the raw features"),
    seed: int = typer.Option(0, help="seed of the split, initialisation and batches"),
    epochs: int = typer.Option(30, min=1),
    lr: float = typer.Option(0.03, min=0.0),
    batch_size: int = typer.Option(32, min=1),
    name: str = typer.Option("qumos-model", help="model name (used by the services)"),
    data_dir: Path = typer.Option(Path("data"), help="where full MNIST/Fashion-MNIST live"),
    out: Path = typer.Option(DEFAULT_ARTIFACT, help="artifact directory to write"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Train a distributed QNN and write its artifact directory."""
    from qumos.artifact import save_artifact
    from qumos.datasets import load_task
    from qumos.spec import design_from_flags
    from qumos.train import TrainConfig, train_design

    try:
        design = load_design_file(design_file) if design_file else design_from_flags(
            dataset=dataset, task=task, fragments=fragments, block=block, n_qubits=qubits,
            entanglement=entanglement, glue=glue, head=head, reupload=reupload)
        t0 = time.perf_counter()
        data = load_task(design.dataset, design.task, seed=seed, data_dir=data_dir)
        cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        with progress_bar() as bar:
            tid = bar.add_task(f"train {design.short()}", total=epochs, info="")
            spec, res, test_acc = train_design(
                design, data, cfg, name=name,
                progress=lambda e, n, v: bar.update(tid, completed=e, info=f"val {v:.3f}"))
        metrics = {"val_acc": res.val_acc, "test_acc": test_acc, "train_acc": res.train_acc,
                   "best_epoch": res.best_epoch, "train_seconds": res.seconds}
        training = {"design": design.model_dump(), "seed": seed, "epochs": epochs, "lr": lr,
                    "batch_size": batch_size}
        save_artifact(spec, out, metrics=metrics, training=training)
    except QumosError as e:
        fail(e)
    result = {"artifact": str(out), "design": design.short(), **metrics,
              "seconds": time.perf_counter() - t0,
              "fragments": [str(out / f"fragments/fragment-{k}.json")
                            for k in range(len(design.fragments))]}
    emit(result, as_json, f"trained {design.short()} on {design.dataset}-{design.task} "
         f"(seed {seed}): validation accuracy {res.val_acc:.3f}, test accuracy {test_acc:.3f}\n"
         f"artifact: {out}")


@app.command()
def evaluate(
    artifact: Path = typer.Argument(DEFAULT_ARTIFACT, help="artifact directory"),
    backend: str = typer.Option("torch", help="torch (simulator) or aer (qiskit-aer, exact)"),
    shots: Optional[int] = typer.Option(None, min=1, help="aer only: sample with shots"),
    data_dir: Path = typer.Option(Path("data")),
    limit: Optional[int] = typer.Option(None, min=1, help="evaluate the first N test samples"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Recompute the test accuracy of an artifact with the torch simulator or with Aer."""
    from qumos.artifact import load_artifact
    from qumos.datasets import load_task

    if backend not in ("torch", "aer"):
        fail(QumosError(f"--backend: {backend!r} is not a backend; allowed: torch, aer"))
    try:
        art = load_artifact(artifact)
        seed = int(art.training.get("seed", 0))
        data = load_task(art.spec.dataset, art.spec.task, seed=seed, data_dir=data_dir)
    except QumosError as e:
        fail(e)
    x, y = data.test.x[:limit], data.test.y[:limit]
    t0 = time.perf_counter()
    if backend == "torch":
        from qumos.model import DistributedQNN, predict_proba

        probs = predict_proba(DistributedQNN(art.spec), x).numpy()
    else:
        probs = aer_predict(art.spec, x, shots=shots, seed=seed)
    acc = float((probs.argmax(1) == y).mean())
    result = {"artifact": str(artifact), "backend": backend, "shots": shots,
              "test_acc": acc, "n": int(len(y)), "seconds": time.perf_counter() - t0,
              "trained_test_acc": art.metrics.get("test_acc")}
    emit(result, as_json, f"{backend}{'' if shots is None else f' ({shots} shots)'}: "
         f"test accuracy {acc:.3f} on {len(y)} samples ({result['seconds']:.1f}s)")


def aer_predict(spec, features, shots=None, seed=None):
    """Class probabilities computed fragment by fragment on Aer, in this process."""
    from qumos.chain import run_chain
    from qumos.quantum import AerRunner

    runners = [AerRunner(f) for f in spec.fragments]
    return run_chain(spec, features, lambda k, a: runners[k].run(a, shots=shots, seed=seed))


def main() -> None:  # pragma: no cover
    try:
        app()
    except QumosError as e:
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)


def _register_commands() -> None:
    """Commands of the services, attacker and search engine live in their own modules."""
    import importlib

    for mod in ("qumos.cli_services", "qumos.cli_attack", "qumos.cli_search",
                "qumos.cli_compose"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


_register_commands()


if __name__ == "__main__":  # pragma: no cover
    app()
