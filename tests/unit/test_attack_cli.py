"""`qumos attack`: the JSON summary and bad input (exit 2, naming the flag, nothing run)."""

import json
import subprocess
import sys

import pytest

from tests.support.reports import assert_report_consistent


def qumos(*args):
    # the `qumos` console script's entry point (`-m qumos.cli` would not see the commands
    # registered from other modules)
    return subprocess.run(
        [sys.executable, "-c", "from qumos.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_attack_json_summary(small_artifact):
    r = qumos(
        "attack",
        "--artifact",
        str(small_artifact),
        "--profile",
        "breach+queries",
        "--queries",
        "10",
        "--epochs",
        "2",
        "--restarts",
        "1",
        "--seeds",
        "0,1",
        "--strategies",
        "scratch,logreg,head_only,insider",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["profile"] == "breach+queries" and d["queries"] == 10
    for k in ("victim_acc", "S", "security"):
        assert len(d[k]) == 2, k
    assert_report_consistent(d)
    assert d["S_reference"] in ("scratch", "logreg")
    assert [p["provider"] for p in d["providers"]] == ["provider-a", "provider-b", "provider-c"]
    for p in d["providers"]:
        assert set(p) >= {"provider", "A", "leak", "theft_ratio", "fidelity"}
        assert p["A"][0] == pytest.approx(p["theft_ratio"][0] * d["victim_acc"][0])


def _tiny_units(artifact, *args: str) -> list[str]:
    """A two-step, one-restart attack on seed 0 with two strategies: its breach units."""
    r = qumos(
        "attack", "--artifact", str(artifact), *args, "--epochs", "2", "--restarts", "1",
        "--seeds", "0", "--strategies", "knn,head_only", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return [p["provider"] for p in json.loads(r.stdout)["providers"]]


def test_attack_reads_a_provider_directory(small_artifact, tmp_path):
    from qumos.artifact import load_artifact
    from qumos.store import ProviderStore

    store = ProviderStore.create(tmp_path / "provider-c", "provider-c")
    store.put(load_artifact(small_artifact).fragment_file(2))
    assert _tiny_units(small_artifact, "--provider-dir", str(store.root)) == ["provider-c"]


def test_attack_by_coalition_size_breaches_every_coalition_up_to_it(small_artifact):
    units = _tiny_units(small_artifact, "--profile", "coalition", "--coalition", "2")
    assert units == [
        "provider-a",
        "provider-b",
        "provider-c",
        "provider-a+provider-b",
        "provider-a+provider-c",
        "provider-b+provider-c",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--profile", "steal"], "--profile: unknown 'steal'"),
        (
            ["--profile", "coalition", "--coalition", "provider-a,provider-z"],
            "--coalition: ['provider-z'] not in the design",
        ),
        (
            ["--profile", "coalition", "--coalition", "provider-a,provider-b,provider-c"],
            "--coalition: breaches 3 of 3 providers",
        ),
        (
            ["--profile", "coalition", "--coalition", "provider-a,evil"],
            "--coalition: ['evil'] not providers of the designs",
        ),
        (["--profile", "coalition"], "--coalition: profile coalition needs"),
        (["--profile", "coalition", "--coalition", "0"], "--coalition: profile coalition needs"),
        (["--profile", "queries", "--queries", "1000"], "--queries: 1000 is more than the"),
        (["--strategies", "insider"], "--strategies: unknown 'insider'"),
        (["--seeds", "x"], "--seeds: 'x' is not"),
        (
            ["--profile", "breach+queries", "--orchestrator", "http://127.0.0.1:9"],
            "--orchestrator: live queries need the breached provider's log",
        ),
    ],
)
def test_attack_bad_input_exits_2_naming_the_flag(small_artifact, args, message):
    r = qumos("attack", "--artifact", str(small_artifact), "--seeds", "0", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in " ".join(r.stderr.split()), r.stderr


def test_attack_without_a_victim_is_refused():
    r = qumos("attack", "--profile", "breach")
    assert r.returncode == 2 and "--artifact" in r.stderr
