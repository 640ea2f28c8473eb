"""The CLI a new user meets: malformed design files, --json errors, output without a
terminal, help text."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def qumos(*args, env=None):
    import os

    return subprocess.run(
        [sys.executable, "-m", "qumos.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("bad.yaml", "dataset: digits\nfragments: [\n  - depth: 2\n", "line 3, column 3"),
        ("bad.json", '{"dataset": "digits",\n "fragments": [}\n', "line 2, column 16"),
    ],
)
def test_malformed_design_file_exit_2_with_line_and_column(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    r = qumos("train", str(path), "--out", str(tmp_path / "a"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"design file {path}: {where}: not valid" in r.stderr.replace("\n", " ")
    # --json: one JSON error object on stdout
    r = qumos("train", str(path), "--out", str(tmp_path / "a"), "--json")
    assert r.returncode == 2
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "QumosError" and where in err["message"]


def test_design_errors_in_one_style(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("fragments:\n  - {n_qubits: 3, depth: 2}\n  - {depth: 2}\n")
    r = qumos("train", str(path), "--json")
    assert r.returncode == 2
    msg = json.loads(r.stdout)["error"]["message"]
    assert msg.startswith("fragments[0].n_qubits: is 3;"), msg
    assert "n_inputs" not in msg  # a field the user never set


def test_progress_without_a_terminal_prints_plain_lines(tmp_path):
    r = qumos("train", "--epochs", "2", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train ")]
    assert lines[-1].startswith("train rxyz_cnot:2-") and ": 2/2 val " in lines[-1], r.stderr
    assert "" not in [ln.strip() for ln in r.stderr.splitlines()]  # no blank bar lines


def test_help_has_no_placeholders_nor_cut_sentences():
    from qumos.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "80"}).output
    commands = top.split("Commands:")[1]
    assert "..." not in commands and "in-process model, attack" in " ".join(commands.split())
    train = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "80"}).output
    assert "<bool>" not in train and "--json" in train
    assert "no-\n" not in train
