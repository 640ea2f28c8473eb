"""What every `qumos` command module shares: the console, --json output, errors (exit 2),
progress bars. The commands live in qumos.cli (train, evaluate) and the cli_* modules;
qumos.cli registers them all on one Typer app."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

console = Console(stderr=True)

DEFAULT_ARTIFACT = Path("artifacts/default")


def emit(result: dict, as_json: bool, human: str | None = None) -> None:
    """Print the command's result: one JSON object with --json, else readable text."""
    if as_json:
        print(json.dumps(result, default=str))
    elif human:
        Console(soft_wrap=True).print(human, markup=False, highlight=False)


def _json_mode() -> bool:
    """Did the running command get --json? (Its parameter is `as_json` everywhere.)"""
    try:  # typer >= 0.20 carries its own copy of click
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover
        from click import get_current_context  # type: ignore[no-redef]
    ctx = get_current_context(silent=True)
    if ctx is not None:
        return bool(ctx.params.get("as_json"))
    return "--json" in sys.argv[1:]


def fail(e: Exception) -> None:
    """Exit 2 with the error: on stderr as text, and with --json also as one JSON object
    on stdout, {"error": {"type", "message"}}."""
    if _json_mode():
        print(json.dumps({"error": {"type": type(e).__name__, "message": str(e)}}))
    console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


class PlainProgress:
    """`Progress`'s API for output that is not a terminal (a log, CI, a pipe): a plain
    line when a task advances, at most every `every` seconds (and when it finishes),
    instead of a bar that renders as blank lines."""

    def __init__(self, every: float = 5.0):
        self.every = every
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, **fields) -> TaskID:
        tid = len(self.tasks)
        self.tasks[tid] = {
            "description": description,
            "total": total,
            "completed": 0,
            "t0": time.monotonic(),
            "printed": 0.0,
            "fields": fields,
        }
        console.print(f"{description} ...", markup=False, highlight=False, soft_wrap=True)
        return TaskID(tid)

    def update(
        self,
        tid: int,
        completed: float | None = None,
        total: float | None = None,
        advance: float | None = None,
        **fields,
    ) -> None:
        t = self.tasks[tid]
        before = t["completed"]
        if total is not None:
            t["total"] = total
        if advance is not None:
            t["completed"] += advance
        if completed is not None:
            t["completed"] = completed
        t["fields"].update(fields)
        now = time.monotonic()
        done = t["total"] is not None and t["completed"] >= t["total"]
        if t["completed"] != before and (done or now - t["printed"] >= self.every):
            t["printed"] = now
            total_s = "?" if t["total"] is None else f"{t['total']:g}"
            console.print(
                f"{t['description']}: {t['completed']:g}/{total_s} "
                f"{t['fields'].get('info', '')} ({now - t['t0']:.0f}s)".rstrip(),
                markup=False,
                highlight=False,
                soft_wrap=True,
            )


def progress_bar(transient: bool = True) -> Progress | PlainProgress:
    """A progress bar on a terminal; plain progress lines otherwise."""
    if not console.is_terminal:
        return PlainProgress()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )


def attack_progress(bar, tid):
    """A qumos.attack progress callback showing seed, breach, strategy and epoch."""

    def prog(i: dict) -> None:
        bar.update(
            tid,
            completed=i.get("done", 0),
            info=f"seed {i.get('seed')} {i.get('provider') or ''} "
            f"{i.get('strategy') or ''} epoch {i.get('epoch', '-')}",
        )

    return prog


def parse_coalition(
    text: str, flag: str, n_providers: int | None = None
) -> tuple[tuple[str, ...], int]:
    """`--...coalition`: provider names (provider-a,provider-c) or a number m (every
    coalition of up to m providers in turn). Returns (names, size); checked against the
    `n_providers` every design has when it is known (otherwise against provider-a..z;
    the attack's config checks the victim's own providers before it breaches)."""
    from qumos.errors import QumosError
    from qumos.spec import provider_name

    text = text.strip()
    if n_providers is not None and n_providers < 2:
        raise QumosError(
            f"{flag}: the designs have {n_providers} provider; a coalition needs designs of "
            "2 or more fragments (or use profile breach)"
        )
    allowed = [provider_name(k) for k in range(26 if n_providers is None else n_providers)]
    if text.isdigit():
        m = int(text)
        if n_providers is not None and not 1 <= m < n_providers:
            raise QumosError(
                f"{flag}: {m} providers; allowed: 1 to {n_providers - 1} (the designs have "
                f"{n_providers}; all of them together hold the whole model)"
            )
        return (), m
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [n for n in names if n not in allowed]
    if unknown:
        sizes = "a number >= 1" if n_providers is None else f"a number 1 to {n_providers - 1}"
        raise QumosError(
            f"{flag}: {unknown} not providers of the designs; allowed: {', '.join(allowed)}, "
            f"or {sizes}"
        )
    return names, 0
