"""`qumos compose-demo`: the end-to-end demo against services that are already running
(the compose deployment's one-shot `demo` job; works against any deployment).

Steps: use the model found in the artifact directory (or train the default one there),
wait for every service's /readyz, deploy the fragments to the providers and the company
part to the orchestrator, predict the test set through the orchestrator and compare every
probability with the in-process torch model, run the attack through the attacker service,
print the report. Exit code 1 if predictions disagree or the attack fails.

Configuration comes from options or, as in docker-compose.yml, the environment:
    QUMOS_DEMO_ORCHESTRATOR_URL   http://orchestrator:8000
    QUMOS_DEMO_ATTACKER_URL       http://attacker:8000
    QUMOS_DEMO_PROVIDERS          provider-a=http://provider-a:8000,...
    QUMOS_DEMO_TOKENS_DIR         one token file per provider, named after it (/run/secrets)
    QUMOS_DEMO_ADMIN_TOKEN_FILE   the orchestrator's admin token (/run/secrets/admin)
    QUMOS_DEMO_ATTACKER_TOKEN_FILE  the attacker service's token (/run/secrets/attacker)
    QUMOS_DEMO_ARTIFACT           the artifact directory (/data/model)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from qumos.cli_common import console, emit, fail, progress_bar
from qumos.errors import QumosError

commands = typer.Typer()  # added to the `qumos` app by qumos.cli

TOLERANCE = 1e-4  # Aer (exact) vs the torch simulator, per probability


def ensure_model(path: Path, epochs: int, seed: int):
    """The artifact at `path`, or the default design trained there first."""
    from qumos.artifact import load_artifact, save_artifact
    from qumos.datasets import load_task
    from qumos.spec import design_from_flags
    from qumos.train import TrainConfig, train_design

    if (path / "model.json").is_file():
        return load_artifact(path), False
    design = design_from_flags(dataset="digits", task=4, fragments="2-2-2")
    data = load_task(design.dataset, design.task, seed=seed)
    with progress_bar() as bar:
        tid = bar.add_task(f"train {design.short()}", total=epochs, info="")
        spec, res, test_acc = train_design(
            design, data, TrainConfig(epochs=epochs, seed=seed), name="qumos-demo",
            progress=lambda e, n, v: bar.update(tid, completed=e, info=f"val {v:.3f}"))
    save_artifact(spec, path, metrics={"val_acc": res.val_acc, "test_acc": test_acc,
                                       "train_acc": res.train_acc,
                                       "train_seconds": res.seconds},
                  training={"design": design.model_dump(), "seed": seed, "epochs": epochs})
    return load_artifact(path), True


def run_attack(attacker_url: str, body: dict, timeout: float, token: str) -> dict:
    import httpx

    with httpx.Client(timeout=30.0, headers={"Authorization": f"Bearer {token}"}) as client:
        r = client.post(f"{attacker_url}/v1/attacks", json=body)
        if r.status_code != 202:
            raise QumosError(f"attacker: POST /v1/attacks gave HTTP {r.status_code}: "
                             f"{r.text[:500]}")
        job_id = r.json()["id"]
        t0 = time.perf_counter()
        with progress_bar() as bar:
            tid = bar.add_task("attack", total=None, info="")
            while True:
                job = client.get(f"{attacker_url}/v1/attacks/{job_id}").json()
                p = job.get("progress") or {}
                bar.update(tid, total=p.get("total"), completed=p.get("done", 0),
                           info=f"{p.get('strategy', '')} seed {p.get('seed', '')} "
                                f"epoch {p.get('epoch', '')}")
                if job["status"] in ("succeeded", "failed", "interrupted"):
                    break
                if time.perf_counter() - t0 > timeout:
                    raise QumosError(f"attacker: job {job_id} not done after {timeout:.0f}s "
                                     f"(status {job['status']}, progress {p})")
                time.sleep(1.0)
    if job["status"] != "succeeded":
        raise QumosError(f"attacker: job {job_id} {job['status']}: {job.get('error')}")
    return job


@commands.command("compose-demo")
def compose_demo(
    orchestrator_url: str = typer.Option("http://127.0.0.1:8080",
                                         envvar="QUMOS_DEMO_ORCHESTRATOR_URL"),
    attacker_url: str = typer.Option("http://127.0.0.1:8090", envvar="QUMOS_DEMO_ATTACKER_URL"),
    providers: str = typer.Option(..., envvar="QUMOS_DEMO_PROVIDERS",
                                  help="name=url,... of every provider"),
    tokens_dir: Path = typer.Option(..., envvar="QUMOS_DEMO_TOKENS_DIR",
                                    help="one token file per provider, named after it"),
    admin_token_file: Path = typer.Option(..., envvar="QUMOS_DEMO_ADMIN_TOKEN_FILE"),
    attacker_token_file: Path = typer.Option(..., envvar="QUMOS_DEMO_ATTACKER_TOKEN_FILE",
                                             help="the attacker service's token"),
    artifact: Path = typer.Option(Path("artifacts/default"), envvar="QUMOS_DEMO_ARTIFACT",
                                  help="model to deploy; the default one is trained here "
                                       "if there is none"),
    epochs: int = typer.Option(30, min=1, envvar="QUMOS_DEMO_EPOCHS",
                               help="training epochs if a model must be trained"),
    attack_epochs: int = typer.Option(75, min=1, envvar="QUMOS_DEMO_ATTACK_EPOCHS",
                                      help="attacker training steps per restart"),
    attack_seeds: str = typer.Option("0", envvar="QUMOS_DEMO_ATTACK_SEEDS"),
    attack_restarts: int = typer.Option(24, min=1, envvar="QUMOS_DEMO_ATTACK_RESTARTS"),
    attack_profiles: str = typer.Option("breach,breach+queries",
                                        envvar="QUMOS_DEMO_ATTACK_PROFILES",
                                        help="attacker profiles run in turn"),
    attack_queries: int = typer.Option(100, min=1, envvar="QUMOS_DEMO_ATTACK_QUERIES"),
    limit: int = typer.Option(200, min=1, help="test samples predicted through the services"),
    ready_timeout: float = typer.Option(300.0, min=1.0),
    attack_timeout: float = typer.Option(900.0, min=1.0),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Deploy to running services, check predictions against the in-process model,
    attack through the attacker service, print the report."""
    import httpx
    import numpy as np
    from qumos.attack import report_table
    from qumos.client import create_key, predict, wait_ready
    from qumos.config import parse_providers, read_token_file
    from qumos.datasets import load_task
    from qumos.deploy import deploy_artifact
    from qumos.model import DistributedQNN, predict_proba

    t0 = time.perf_counter()
    try:
        try:
            urls = parse_providers(providers)
        except ValueError as e:
            raise QumosError(f"--providers: {e}") from None
        tokens = {n: read_token_file(tokens_dir / n, f"--tokens-dir ({n})") for n in urls}
        admin = read_token_file(admin_token_file, "--admin-token-file")
        attacker_token = read_token_file(attacker_token_file, "--attacker-token-file")
        seeds = [int(s) for s in attack_seeds.split(",") if s.strip()]
        console.print(f"waiting for {', '.join(urls)}, orchestrator, attacker")
        ready = wait_ready({**urls, "orchestrator": orchestrator_url.rstrip("/"),
                            "attacker": attacker_url.rstrip("/")}, ready_timeout, poll=0.5)
        art, trained = ensure_model(artifact, epochs, seed=0)
        spec = art.spec
        console.print(("trained" if trained else "found") + f" model {spec.name} "
                      f"(test accuracy {art.metrics.get('test_acc', float('nan')):.3f}) "
                      f"in {artifact}")
        deployed = deploy_artifact(art, orchestrator_url, admin, urls, tokens)
        console.print(f"deployed {len(deployed['fragments'])} fragments: " + ", ".join(
            f"{d['fragment_id']} -> {d['provider']}" for d in deployed["fragments"]))

        seed = int(art.training.get("seed", 0))
        data = load_task(spec.dataset, spec.task, seed=seed)
        raw, y = data.test.raw[:limit], data.test.y[:limit]
        t1 = time.perf_counter()
        probs: list[list[float]] = []
        # clients use API keys like any client: one for this check, one for the attacker
        demo_key = create_key(orchestrator_url, admin, "compose-demo")["key"]
        attacker_key = create_key(orchestrator_url, admin, "compose-attacker")["key"]
        with httpx.Client(timeout=120.0) as client:
            for i in range(0, len(raw), 100):
                p = predict(client, orchestrator_url, spec.name, raw[i:i + 100],
                            api_key=demo_key).probabilities
                assert p is not None, "the demo model's policy returns probabilities"
                probs += p
        predict_s = time.perf_counter() - t1
        remote = np.asarray(probs)
        local = predict_proba(DistributedQNN(spec), data.test.x[:limit]).detach().numpy()
        max_diff = float(np.abs(remote - local).max())
        acc_remote = float((remote.argmax(1) == y).mean())
        acc_local = float((local.argmax(1) == y).mean())
        console.print(f"predicted {len(y)} test images through the orchestrator in "
                      f"{predict_s:.1f}s: accuracy {acc_remote:.3f} (in-process model "
                      f"{acc_local:.3f}); max |p_service - p_local| = {max_diff:.1e}")
        if max_diff > TOLERANCE:
            raise QumosError(f"the services' probabilities differ from the in-process model's "
                             f"by {max_diff:.2e} > {TOLERANCE}")

        jobs = {}
        for profile in [p.strip() for p in attack_profiles.split(",") if p.strip()]:
            body = {"profile": profile,
                    "budget": {"fraction": 0.05, "epochs": attack_epochs,
                               "restarts": attack_restarts, "queries": attack_queries},
                    "seeds": seeds, "design": art.training.get("design"),
                    "dataset": spec.dataset, "task": spec.task, "split_seed": seed,
                    "model": spec.name, "api_key": attacker_key}
            console.print(f"attack job: profile {profile}")
            jobs[profile] = run_attack(attacker_url.rstrip("/"), body, attack_timeout,
                                       attacker_token)
    except (QumosError, ValueError) as e:
        fail(e)
    first = next(iter(jobs.values()))["results"] if jobs else {}
    result = {"model": spec.name, "trained": trained, "ready_seconds": ready,
              "deployed": deployed, "n_predicted": len(y), "accuracy_service": acc_remote,
              "accuracy_local": acc_local, "max_abs_diff": max_diff,
              "predict_seconds": predict_s,
              "attacks": {p: {"job": j["id"], **j["results"]} for p, j in jobs.items()},
              "seconds": time.perf_counter() - t0}
    emit(result, as_json, "".join(
        f"\n\nbreached {j['results'].get('provider')}, profile {p}:\n"
        + report_table(j["results"]) for p, j in jobs.items())
        + f"\n\ndemo done in {result['seconds']:.0f}s")
    if not as_json:
        print(json.dumps({"demo": "ok", "breached": first.get("provider"),
                          "security": {p: j["results"].get("security")
                                       for p, j in jobs.items()},
                          "max_abs_diff": max_diff}))
