"""Three live providers and the orchestrator as uvicorn processes: the chain equals the
in-process model (on either HTTP transport), providers are isolated, bad input is
refused."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from qumos.client import predict

pytestmark = pytest.mark.integration


def predict_all(stack, model, raw, batch=48, **kw):
    with stack.client(timeout=60) as c:
        parts = [
            predict(c, stack.orchestrator_url, model, raw[i : i + batch], **kw)
            for i in range(0, len(raw), batch)
        ]
    probs = np.concatenate([np.array(p.probabilities) for p in parts])
    labels = sum((p.labels for p in parts), [])
    return probs, labels


def test_exact_mode_equals_in_process_model(stack, live_artifact, digits_test, reference_probs):
    probs, labels = predict_all(stack, "digits4", digits_test.raw)
    assert probs.shape == reference_probs.shape == (len(digits_test.y), 4)
    np.testing.assert_allclose(probs, reference_probs, atol=1e-4)
    assert labels == [live_artifact.spec.classes[i] for i in reference_probs.argmax(1)]


def test_httpx_own_transport_is_one_setting_away(
    tmp_path, live_artifact, digits_test, reference_probs
):
    """The lean transport's alternative (docs/performance.md): the orchestrator with
    HTTP_TRANSPORT=httpcore and a client on httpx's own transport give the same answers."""
    from qumos.client import make_client
    from qumos.localstack import stack_on_free_ports

    with stack_on_free_ports(
        tmp_path, with_attacker=False, orchestrator_env={"QUMOS_ORCH_HTTP_TRANSPORT": "httpcore"}
    ) as s:
        s.deploy(live_artifact)
        with make_client(timeout=60, transport="httpcore") as c:
            got = predict(
                c, s.orchestrator_url, "digits4", digits_test.raw[:48], api_key=s.client_key
            )
    np.testing.assert_allclose(got.probabilities, reference_probs[:48], atol=1e-4)


def test_isolation(stack, live_artifact):
    spec = live_artifact.spec
    # each provider's data directory holds only its own fragment, file by file
    for k, name in enumerate(spec.placement):
        root = stack.data_dir(name)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        assert files == ["access.jsonl", f"fragments/digits4.{k}.json", "provider.json"], files
        stored = json.loads((root / "fragments" / f"digits4.{k}.json").read_text())
        assert stored["index"] == k and stored["provider"] == name
        assert stored["fragment"]["params"] == spec.fragments[k].params
        for j in range(spec.n_fragments):
            if j != k:
                assert (
                    str(spec.fragments[j].params[0])
                    not in (root / "fragments" / f"digits4.{k}.json").read_text()
                )
    # the orchestrator holds no fragment weights
    saved = json.loads((stack.workdir / "orchestrator" / "models" / "digits4.json").read_text())
    assert all(f["params"] is None for f in saved["fragments"])
    # every deploy or execute without the provider's own token is refused
    with httpx.Client(timeout=30) as c:
        for k, name in enumerate(spec.placement):
            url = stack.provider_urls[name]
            other = spec.placement[(k + 1) % len(spec.placement)]
            ff = live_artifact.fragment_file(k).model_dump_json()
            ex = {"inputs": [[0.0] * spec.fragments[k].n_inputs]}
            for headers, status in [
                ({}, 401),
                ({"Authorization": "Bearer wrong-token-x"}, 403),
                ({"Authorization": f"Bearer {stack.token(other)}"}, 403),
                ({"Authorization": f"Bearer {stack.admin_token}"}, 403),
            ]:
                r = c.put(f"{url}/v1/fragments/digits4.{k}", content=ff, headers=headers)
                assert r.status_code == status, (name, headers, r.text)
                r = c.post(f"{url}/v1/fragments/digits4.{k}/execute", json=ex, headers=headers)
                assert r.status_code == status, (name, headers, r.text)
            assert (
                c.get(f"{url}/v1/fragments").json()["fragments"][0]["fragment_id"] == f"digits4.{k}"
            )
        company = live_artifact.company_spec().model_dump_json()
        r = c.put(f"{stack.orchestrator_url}/v1/models/digits4", content=company)
        assert r.status_code == 401
        r = c.put(
            f"{stack.orchestrator_url}/v1/models/digits4",
            content=company,
            headers={"Authorization": f"Bearer {stack.token('provider-a')}"},
        )
        assert r.status_code == 403


def test_bad_input_keeps_services_up(stack, live_artifact, digits_test, reference_probs):
    o = stack.orchestrator_url
    pa = stack.provider_urls["provider-a"]
    h = {"Content-Type": "application/json"}
    hk = h | {"Authorization": f"Bearer {stack.client_key}"}  # a client of the public API
    auth = {"Authorization": f"Bearer {stack.token('provider-a')}"} | h
    before = {
        n: sorted(p.read_bytes() for p in (stack.data_dir(n) / "fragments").iterdir())
        for n in stack.provider_names
    }
    cases = [
        (f"{o}/v1/models/digits4/predict", b'{"instances": [[1,2', hk, 422, "body"),
        (
            f"{o}/v1/models/digits4/predict",
            json.dumps({"instances": [[0] * 10]}).encode(),
            hk,
            422,
            "instances[0]",
        ),
        (
            f"{o}/v1/models/digits4/predict",
            b'{"instances": [[NaN' + b",0" * 63 + b"]]}",
            hk,
            422,
            "instances[0][0]",
        ),
        (
            f"{o}/v1/models/digits4/predict",
            b'{"instances": [[-Infinity' + b",0" * 63 + b"]]}",
            hk,
            422,
            "instances[0][0]",
        ),
        (
            f"{o}/v1/models/nope/predict",
            json.dumps({"instances": [[0] * 64]}).encode(),
            hk,
            404,
            "model",
        ),
        (
            f"{o}/v1/models/digits4/predict",
            json.dumps({"instances": [[0] * 64] * 1025}).encode(),
            h,
            413,
            "instances",
        ),
        (f"{o}/v1/models/digits4/predict", b" " * (9 * 1024 * 1024), hk, 413, "body"),
        (
            f"{pa}/v1/fragments/digits4.0/execute",
            json.dumps({"inputs": [[0] * 3]}).encode(),
            auth,
            422,
            "inputs[0]",
        ),
        (
            f"{pa}/v1/fragments/digits4.9/execute",
            json.dumps({"inputs": [[0] * 16]}).encode(),
            auth,
            404,
            "fragment_id",
        ),
        (
            f"{pa}/v1/fragments/digits4.0/execute",
            b'{"inputs": [[NaN' + b",0" * 15 + b"]]}",
            auth,
            422,
            "inputs[0][0]",
        ),
        (f"{pa}/v1/fragments/digits4.0", b'{"format": "qumos-fragment"}', auth, 422, None),
    ]
    with httpx.Client(timeout=60) as c:
        for url, body, headers, status, field in cases:
            method = c.put if url.endswith("digits4.0") else c.post
            r = method(url, content=body, headers=headers)
            assert r.status_code == status, (url, body[:40], r.text)
            err = r.json()["error"]
            assert err["message"]
            if field:
                assert err["field"] == field, (url, err)

        # chunked upload (no Content-Length) over the limit
        def chunks():
            for _ in range(10):
                yield b" " * (1024 * 1024)

        r = c.post(f"{o}/v1/models/digits4/predict", content=chunks(), headers=hk)
        assert r.status_code == 413
        for s in stack.services.values():
            assert s.alive(), s.name
    after = {
        n: sorted(p.read_bytes() for p in (stack.data_dir(n) / "fragments").iterdir())
        for n in stack.provider_names
    }
    assert after == before
    probs, _ = predict_all(stack, "digits4", digits_test.raw[:20])
    np.testing.assert_allclose(probs, reference_probs[:20], atol=1e-4)
