"""The compose deployment, live: docker-compose.yml brought up under a unique project name.

Fails (never skips) when Docker is unavailable, unless QUMOS_SKIP_CONTAINERS=1 (for a
laptop without Docker; CI never sets it). The images are built by `compose build` from
the repository's Dockerfile; offline (QUMOS_PIP_NO_INDEX=1, the default here) they
install from docker/wheelhouse/, which docker/build-offline.sh fills.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.compose import ROOT, compose, docker, docker_problem
from tests.support.reports import assert_report_consistent

pytestmark = [pytest.mark.containers, pytest.mark.slow]

PROVIDERS = ("provider-a", "provider-b", "provider-c")
BREACHED = "provider-b"
SECRETS = ROOT / "docker" / "secrets"
MODEL = "digits4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str, interval: float = 0.5):
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            out = pred()
            if out:
                return out
        except Exception as e:  # noqa: BLE001 - keep polling, report the last problem
            last = e
        time.sleep(interval)
    raise AssertionError(f"{what}: not reached within {timeout}s (last problem: {last})")


class Stack:
    def __init__(self, project: str, env: dict, orch_port: int, attacker_port: int):
        self.project, self.env = project, env
        self.orch = f"http://127.0.0.1:{orch_port}"
        self.attacker = f"http://127.0.0.1:{attacker_port}"
        self.timings: dict[str, float] = {}

    def compose(self, *args, **kw):
        return compose(self.project, *args, env=self.env, **kw)

    def container(self, service: str) -> str:
        out = self.compose("ps", "-q", service).stdout.strip()
        assert out, f"no container for {service}"
        return out.splitlines()[0]

    def volume(self, name: str) -> str:
        return f"{self.project}_{name}"

    def health(self, service: str) -> str:
        return docker(
            "inspect", "-f", "{{.State.Health.Status}}", self.container(service)
        ).stdout.strip()


@pytest.fixture(scope="module")
def stack():
    if os.environ.get("QUMOS_SKIP_CONTAINERS") == "1":
        pytest.skip("QUMOS_SKIP_CONTAINERS=1: container tier skipped on request")
    problem = docker_problem()
    if problem:
        pytest.fail(f"container tier cannot run: {problem}", pytrace=False)
    subprocess.run([str(ROOT / "docker" / "make-secrets.sh")], check=True)
    project = f"qumostest{uuid.uuid4().hex[:8]}"
    env = {
        "QUMOS_ORCH_PORT": str(_free_port()),
        "QUMOS_ATTACKER_PORT": str(_free_port()),
        "QUMOS_PIP_NO_INDEX": os.environ.get("QUMOS_PIP_NO_INDEX", "1"),
        "QUMOS_BREACHED": BREACHED,
        # v1: build with the docker CLI, sharing its layer cache with
        # docker/build-offline.sh (the SDK's own build context misses that cache)
        "COMPOSE_DOCKER_CLI_BUILD": "1",
    }
    s = Stack(project, env, int(env["QUMOS_ORCH_PORT"]), int(env["QUMOS_ATTACKER_PORT"]))
    try:
        t0 = time.monotonic()
        # one build per image (the other services share these images)
        s.compose("build", "provider-a", "orchestrator", "attacker", timeout=1800)
        s.timings["build"] = time.monotonic() - t0
        t0 = time.monotonic()
        s.compose("up", "-d", *PROVIDERS, "orchestrator", "attacker", timeout=600)
        _wait(
            lambda: all(s.health(x) == "healthy" for x in (*PROVIDERS, "orchestrator", "attacker")),
            240,
            "every service healthy",
        )
        s.timings["up_to_ready"] = time.monotonic() - t0
        print(f"\n[containers] timings: {s.timings}")
        yield s
    finally:
        logs = s.compose("logs", "--no-color", "--tail", "40", check=False)
        print(logs.stdout[-6000:])
        s.compose("down", "-v", "--remove-orphans", check=False, timeout=300)


@pytest.fixture(scope="module")
def demo(stack, small_artifact):
    """The one-shot demo job run against the live stack with the test's model (mounted
    read-only), so the host can compare predictions with the same model in process."""
    # pytest's tmp dirs are 0700: copy the artifact somewhere uid 10001 can read
    d = Path(tempfile.mkdtemp(prefix="qumos-art-"))
    art = d / "model"
    shutil.copytree(small_artifact, art)
    for p in [d, *d.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    try:
        r = stack.compose(
            "run",
            "--rm",
            "-v",
            f"{art}:/model:ro",
            "-e",
            "QUMOS_DEMO_ARTIFACT=/model",
            "-e",
            "QUMOS_DEMO_ATTACK_EPOCHS=3",
            "-e",
            "QUMOS_DEMO_ATTACK_RESTARTS=1",
            "-e",
            "QUMOS_DEMO_ATTACK_QUERIES=10",
            "demo",
            "qumos",
            "compose-demo",
            "--json",
            "--limit",
            "120",
            check=False,
            timeout=900,
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert r.returncode == 0, f"demo job failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"demo printed no JSON:\n{r.stdout}\n{r.stderr[-3000:]}"
    return json.loads(lines[-1])


def _expected(small_artifact, n=40):
    from qumos.artifact import load_artifact
    from qumos.datasets import load_task
    from qumos.model import DistributedQNN, predict_proba

    art = load_artifact(small_artifact)
    data = load_task("digits", 4, seed=0)
    raw, x, y = data.test.raw[:n], data.test.x[:n], data.test.y[:n]
    return raw, y, predict_proba(DistributedQNN(art.spec), x).detach().numpy()


_KEYS: dict = {}


def _client_key(stack) -> str:
    """A client API key made with the admin token (compose secret), once per stack."""
    if stack.project not in _KEYS:
        admin = (SECRETS / "admin.token").read_text().strip()
        r = httpx.post(
            f"{stack.orch}/v1/keys",
            json={"name": "container-tests"},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        _KEYS[stack.project] = r.json()["key"]
    return _KEYS[stack.project]


def _predict(stack, raw, key: str | None = "") -> httpx.Response:
    key = _client_key(stack) if key == "" else key
    return httpx.post(
        f"{stack.orch}/v1/models/{MODEL}/predict",
        json={"instances": raw.tolist()},
        timeout=60,
        headers={"Authorization": f"Bearer {key}"} if key else {},
    )


def test_public_api_needs_a_key_and_never_logs_it(stack, demo, small_artifact):
    raw = np.zeros((1, 64))
    r = _predict(stack, raw, key=None)
    assert r.status_code == 401 and "authorization" in r.json()["error"]["message"], r.text
    assert _predict(stack, raw).status_code == 200
    key = _client_key(stack)
    logs = stack.compose("logs", "--no-color", "orchestrator").stdout
    assert key not in logs and key[16:] not in logs


def test_demo_job_deploys_predicts_and_attacks(demo):
    assert demo["model"] == MODEL and demo["trained"] is False
    assert [f["provider"] for f in demo["deployed"]["fragments"]] == list(PROVIDERS)
    assert demo["n_predicted"] == 120
    assert demo["max_abs_diff"] < 1e-4
    assert demo["accuracy_service"] == pytest.approx(demo["accuracy_local"])
    assert set(demo["attacks"]) == {"breach", "breach+queries"}
    for profile, rep in demo["attacks"].items():
        assert rep["provider"] == BREACHED and rep["profile"] == profile
        (p,) = rep["providers"]
        assert p["provider"] == BREACHED
        assert {"substitute", "finetune", "head_only"} <= set(p["by_strategy"])
        assert {"scratch", "logreg", "mlp", "knn"} <= set(rep["references"])
        assert_report_consistent(rep)  # S, A, leak and security follow from the accuracies
    # the insider's queries went through the public API, but the compose orchestrator
    # sends identical rows of a call once (QUMOS_ORCH_DEDUP_ROWS, on by default), which
    # breaks its repeat mark: at provider-b it attributes none of its rows
    ins = demo["attacks"]["breach+queries"]["providers"][0]["by_strategy"]["insider"]
    assert ins["acc"][0] is None and "nothing to use" in ins["note"], ins


def test_attack_report_served_by_attacker(stack, demo):
    rep = demo["attacks"]["breach"]
    r = httpx.get(f"{stack.attacker}/v1/attacks/{rep['job']}", timeout=10)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "succeeded"
    assert job["results"]["provider"] == BREACHED
    assert job["results"]["providers"][0]["A"] == rep["providers"][0]["A"]


def test_predictions_through_published_port_match_in_process(stack, demo, small_artifact):
    raw, y, want = _expected(small_artifact)
    r = _predict(stack, raw)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["probabilities"])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert r.json()["predictions"] == want.argmax(1).tolist()


def test_each_provider_volume_holds_only_its_own_fragment(stack, demo):
    for k, name in enumerate(PROVIDERS):
        out = docker(
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            f"{stack.volume(name + '-data')}:/d:ro",
            f"qumos-provider:{os.environ.get('QUMOS_IMAGE_TAG', 'latest')}",
            "python3",
            "-c",
            "import json, pathlib; r = pathlib.Path('/d'); print(json.dumps({"
            "'files': sorted(str(p.relative_to(r)) for p in r.rglob('*') "
            "if p.is_file()), 'marker': json.loads((r / 'provider.json')"
            ".read_text()), 'frags': [json.loads(p.read_text()) for p in "
            "sorted((r / 'fragments').glob('*.json'))]}))",
        ).stdout
        got = json.loads(out)
        assert got["marker"]["name"] == name
        assert [f for f in got["files"] if f.startswith("fragments/")] == [
            f"fragments/{MODEL}.{k}.json"
        ], got["files"]
        assert set(got["files"]) <= {
            "provider.json",
            "access.jsonl",
            f"fragments/{MODEL}.{k}.json",
        }, got["files"]
        (frag,) = got["frags"]
        assert frag["index"] == k and frag["provider"] == name
        assert frag["fragment"]["params"], "a deployed fragment holds its weights"
    # the orchestrator's volume holds no fragment weights
    out = docker(
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        f"{stack.volume('orchestrator-data')}:/d:ro",
        f"qumos-provider:{os.environ.get('QUMOS_IMAGE_TAG', 'latest')}",
        "python3",
        "-c",
        "import json, pathlib; print(json.dumps([json.loads("
        "p.read_text()) for p in pathlib.Path('/d').rglob('*.json')]))",
    ).stdout
    files = json.loads(out)
    # the registered company part (a ModelSpec), the company's canaries (angle vectors
    # with expected outputs), the client keys (salted hashes) and quota counters; none
    # carries a fragment's weights
    files = [d for d in files if set(d) != {"keys"} and set(d) != {"usage"}]
    models = [d for d in files if "schema_version" in d]
    assert len(models) == 1, files
    assert all(f.get("params") is None for f in models[0]["fragments"])
    assert all(
        set(d) <= {"fragments", "tolerance", "shots_z"} for d in files if "schema_version" not in d
    ), files  # canaries: inputs and outputs only


def test_attacker_reads_only_the_breached_volume_and_has_no_credentials(stack, demo):
    """No credential of another service: only its own API token (who may submit jobs)."""
    cid = stack.container("attacker")
    mounts = json.loads(docker("inspect", "-f", "{{json .Mounts}}", cid).stdout)
    by_dest = {m["Destination"]: m for m in mounts}
    assert set(by_dest) == {"/breached", "/data", "/run/secrets/attacker"}, by_dest
    assert by_dest["/breached"]["Name"] == stack.volume(f"{BREACHED}-data")
    assert by_dest["/breached"]["RW"] is False
    assert by_dest["/data"]["Name"] == stack.volume("attacker-data")
    probe = r"""
import json, os, pathlib, urllib.request, urllib.error
out = {"secrets": sorted(os.listdir("/run/secrets")) if os.path.exists("/run/secrets") else [],
       "breached": sorted(str(p) for p in pathlib.Path("/breached").rglob("*.json")),
       "write": None, "calls": {}}
try:
    open("/breached/x", "w")
    out["write"] = "allowed"
except OSError as e:
    out["write"] = e.errno
for name in ("provider-a", "provider-b", "provider-c"):
    for label, headers in (("none", {}), ("guess", {"Authorization": "Bearer " + "x" * 43})):
        req = urllib.request.Request(
            f"http://{name}:8000/v1/fragments/digits4.0/execute", method="POST",
            data=json.dumps({"inputs": [[0.0] * 16]}).encode(),
            headers={"Content-Type": "application/json", **headers})
        try:
            code = urllib.request.urlopen(req, timeout=10).status
        except urllib.error.HTTPError as e:
            code = e.code
        out["calls"][f"{name}/{label}"] = code
print(json.dumps(out))
"""
    got = json.loads(docker("exec", cid, "python3", "-c", probe).stdout)
    assert got["secrets"] == ["attacker"]  # its own API token, no other service's
    assert got["breached"] == ["/breached/fragments/digits4.1.json", "/breached/provider.json"]
    assert got["write"] == 30  # EROFS: the breached volume is mounted read-only
    for name in PROVIDERS:
        assert got["calls"][f"{name}/none"] == 401, got
        assert got["calls"][f"{name}/guess"] == 403, got


def test_killed_provider_gives_503_naming_it_and_recovers(stack, demo, small_artifact):
    raw, y, want = _expected(small_artifact, n=10)
    victim = "provider-c"
    docker("kill", stack.container(victim))
    r = _predict(stack, raw)
    assert r.status_code == 503, r.text
    msg = r.json()["error"]["message"]
    assert victim in msg, msg
    docker("start", stack.container(victim))
    _wait(lambda: stack.health(victim) == "healthy", 120, f"{victim} healthy again")
    r = _wait(
        lambda: (lambda x: x if x.status_code == 200 else None)(_predict(stack, raw)),
        60,
        "predictions back",
    )
    np.testing.assert_allclose(np.asarray(r.json()["probabilities"]), want, atol=1e-4)


def test_down_leaves_nothing_behind(stack):
    """`down -v` removes every container, network and volume of a project. The test brings
    up a project of its own (one provider, its volume and the network; the images are the
    ones the module's stack built), so it needs no place in the test order."""
    own = Stack(f"qumostest{uuid.uuid4().hex[:8]}", stack.env, _free_port(), _free_port())
    label = f"label=com.docker.compose.project={own.project}"
    try:
        own.compose("up", "-d", "provider-a", timeout=300)
        assert docker("ps", "-aq", "--filter", label).stdout.strip() != ""
        assert own.volume("provider-a-data") in docker("volume", "ls", "-q").stdout.split()
    finally:
        own.compose("down", "-v", "--remove-orphans", timeout=300)
    assert docker("ps", "-aq", "--filter", label).stdout.strip() == ""
    assert docker("network", "ls", "-q", "--filter", label).stdout.strip() == ""
    assert docker("volume", "ls", "-q", "--filter", label).stdout.strip() == ""
    names = docker("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [n for n in names if n.startswith(own.project)], names
