"""Property-based API tests: schemathesis generates valid and invalid requests from each
service's OpenAPI schema and runs every check (no 5xx, responses conform to the schema,
status codes and content types documented, invalid data refused, ...), in-process over
ASGI, with a deployed model, valid credentials, and a bounded number of examples: the three
services (provider, orchestrator, attacker), 0 responses 5xx.

The number of examples per operation is QUMOS_SCHEMATHESIS_EXAMPLES (default 25; CI-time
budget ~1 minute per service on 2 busy cores). Every response is counted; when
QUMOS_RELIABILITY_DIR is set the counts of the services fuzzed are written there (the
`seen` fixture's teardown, after the module's tests, whichever ran and in any order), for
results/reliability.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests.support.services import provider_settings, write_token

EXAMPLES = int(os.environ.get("QUMOS_SCHEMATHESIS_EXAMPLES", "25"))
HEADERS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def seen():
    """Response status counts per service fuzzed; written to QUMOS_RELIABILITY_DIR (if set)
    when the module's tests are done."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    yield counts
    out = os.environ.get("QUMOS_RELIABILITY_DIR")
    if out and counts:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "schemathesis.json").write_text(
            json.dumps(
                {
                    "examples_per_operation": EXAMPLES,
                    "requests": sum(sum(c.values()) for c in counts.values()),
                    "by_service": {
                        s: {str(k): v for k, v in sorted(c.items())} for s, c in counts.items()
                    },
                    "status_5xx": sum(v for c in counts.values() for k, v in c.items() if k >= 500),
                },
                indent=1,
            )
        )


def _deployed_provider(tmp, artifact, k):
    from qumos.store import ProviderStore

    from services.provider.app import create_app

    name = artifact.spec.placement[k]
    s, token = provider_settings(tmp, name, max_batch=64, max_body_bytes=256 * 1024)
    ProviderStore.create(s.data_dir, name).put(artifact.fragment_file(k))
    app = create_app(s)
    app.state.provider.load_all()  # the lifespan's work, for apps mounted in the orchestrator
    app.state.provider.ready = True
    return app, token


@pytest.fixture(scope="module")
def provider_schema(tmp_path_factory, artifact):
    app, token = _deployed_provider(tmp_path_factory.mktemp("st-provider"), artifact, 0)
    HEADERS["provider"] = {"Authorization": f"Bearer {token}"}
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def orchestrator_schema(tmp_path_factory, artifact):
    from qumos.datasets import load_task
    from qumos.deploy import make_canaries
    from qumos.files import atomic_write

    from services.orchestrator.app import create_app
    from services.orchestrator.settings import OrchestratorSettings

    tmp = tmp_path_factory.mktemp("st-orch")
    mounts = {}
    for k, name in enumerate(artifact.spec.placement):
        app, _ = _deployed_provider(tmp, artifact, k)
        mounts[f"http://{name}"] = httpx.ASGITransport(app=app)
    admin = write_token(tmp / "admin_token")
    data = tmp / "orchestrator"
    atomic_write(
        data / "models" / "digits4.json", artifact.company_spec().model_dump_json().encode()
    )
    canaries = make_canaries(artifact.spec, load_task("digits", 4, seed=0).train.raw[:16])
    atomic_write(data / "canaries" / "digits4.json", canaries.model_dump_json().encode())
    s = OrchestratorSettings(
        data_dir=data,
        tokens_dir=tmp / "tokens",
        admin_token_file=tmp / "admin_token",
        max_batch=32,
        max_body_bytes=256 * 1024,
        providers=",".join(f"{n}=http://{n}" for n in artifact.spec.placement),
    )
    HEADERS["orchestrator"] = {"Authorization": f"Bearer {admin}"}
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(s, mounts=mounts))


@pytest.fixture(scope="module")
def attacker_schema(tmp_path_factory, artifact):
    """The attacker with a breached provider-b and its token. Accepted jobs are queued but
    never run (no worker pool: fuzzing must not train models), and the queue is large
    enough that it never fills here (the 503 of a full queue: test_attacker_service)."""
    from types import SimpleNamespace

    from qumos.store import ProviderStore

    from services.attacker.app import create_app
    from services.attacker.settings import AttackerSettings

    tmp = tmp_path_factory.mktemp("st-attacker")
    ProviderStore.create(tmp / "provider-b", "provider-b").put(artifact.fragment_file(1))
    token = write_token(tmp / "attacker_token")
    s = AttackerSettings(
        breached_dir=tmp / "provider-b",
        data_dir=tmp / "attacker",
        admin_token_file=tmp / "attacker_token",
        max_pending=1000,
    )
    app = create_app(s)
    state = app.state.attacker
    state.load()  # the lifespan's work, without its worker pool
    state.pool = SimpleNamespace(submit=lambda *a, **k: None)
    state.ready = True
    HEADERS["attacker"] = {"Authorization": f"Bearer {token}"}
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _run(service: str, case, seen: collections.Counter) -> None:
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    # Every check runs except positive_data_acceptance ("schema-valid data gets 2xx"): our
    # endpoints have rules JSON Schema cannot state (the path's fragment id must match the
    # body's model.index, a fragment must be placed on this provider, a row must have as
    # many values as the deployed fragment takes), so schema-valid data may rightly get a
    # 422 naming the field. The tests in test_provider/test_orchestrator cover acceptance.
    response = case.call_and_validate(
        headers=HEADERS[service], excluded_checks=[positive_data_acceptance]
    )
    seen[response.status_code] += 1
    assert response.status_code < 500, (case.method, case.path, response.text[:300])
    if response.status_code >= 400:  # every error is JSON naming what was wrong
        err = response.json()["error"]
        if case.path.startswith("/v2"):  # the Open Inference Protocol's {"error": "<string>"}
            assert isinstance(err, str) and err, err
        else:
            assert err["type"] and err["message"], err


BUDGET = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# Path parameters of what is deployed: random names mostly meet 404, so every operation
# with path parameters is also fuzzed with these pinned (bodies, queries still generated).
PINNED = {"name": "digits4", "fragment_id": "digits4.0", "version": "1"}


def _pin(case):
    if case.path_parameters:
        case.path_parameters = {k: PINNED.get(k, v) for k, v in case.path_parameters.items()}
    return case


def _fuzz(service: str, schema, seen: dict[str, collections.Counter]) -> None:
    """Every operation, positive (valid per schema) and negative (invalid) data, and with
    the deployed model's path parameters pinned. (schemathesis' pytest `from_fixture`
    loader does not work with pytest 9, so the operations are driven with hypothesis.)"""
    from schemathesis.generation import GenerationMode

    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 5, ops
    for op in ops:
        pinned = (False, True) if "{" in op.path else (False,)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for pin in pinned:
                strategy = op.as_strategy(generation_mode=mode)

                @BUDGET
                @given(case=strategy.map(_pin) if pin else strategy)
                def run(case):
                    _run(service, case, seen[service])

                try:
                    run()
                except Unsatisfiable:
                    # nothing can be invalid (no body, only free-form string path params)
                    assert mode == GenerationMode.NEGATIVE, op.path
                    assert "requestBody" not in op.definition.raw, op.path


def test_provider_api(provider_schema, seen):
    _fuzz("provider", provider_schema, seen)
    assert sum(seen["provider"].values()) >= 2 * EXAMPLES  # 303 at 25 examples


def test_orchestrator_api(orchestrator_schema, seen):
    _fuzz("orchestrator", orchestrator_schema, seen)
    assert sum(seen["orchestrator"].values()) >= 2 * EXAMPLES  # 958 at 25 examples


def test_attacker_api(attacker_schema, seen):
    _fuzz("attacker", attacker_schema, seen)
    assert sum(seen["attacker"].values()) >= 2 * EXAMPLES  # 103 at 25 examples
