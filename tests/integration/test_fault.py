"""Kill one provider process during a stream of requests: the requests it was serving
fail with 503 naming it, no wrong prediction is ever returned, and after a restart (same
data directory, fragment reloaded) predictions are correct again."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.integration


def test_provider_killed_mid_stream(stack, digits_test, reference_probs):
    url = f"{stack.orchestrator_url}/v1/models/digits4/predict"
    rng = np.random.default_rng(0)
    results: list[tuple[np.ndarray, int, dict]] = []
    stop = threading.Event()

    def client_loop():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set() and len(results) < 400:
                idx = rng.choice(len(digits_test.raw), size=8, replace=False)
                r = c.post(
                    url,
                    json={"instances": digits_test.raw[idx].tolist()},
                    headers={"Authorization": f"Bearer {stack.client_key}"},
                )
                results.append((idx, r.status_code, r.json()))

    threads = [threading.Thread(target=client_loop) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(results) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    stack.kill("provider-b")  # SIGKILL mid-stream
    n_at_kill = len(results)
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(60)
    assert n_at_kill >= 10 and len(results) > n_at_kill

    ok = [(i, b) for i, s, b in results if s == 200]
    failed = [(s, b) for _, s, b in results if s != 200]
    assert ok and failed, (len(ok), len(failed))
    for idx, body in ok:  # no wrong prediction, ever
        np.testing.assert_allclose(body["probabilities"], reference_probs[idx], atol=1e-4)
    for status, body in failed:
        assert status == 503, body
        assert "provider-b" in body["error"]["message"]
        assert "digits4.1" in body["error"]["message"]
    # every request after the kill settled failed
    assert all(s == 503 for _, s, _ in results[n_at_kill + 2 :])

    stack.restart("provider-b")  # same data dir: it reloads its fragment
    with httpx.Client(timeout=60) as c:
        r = c.get(f"{stack.provider_urls['provider-b']}/readyz").json()
        assert r["fragments"] == 1
        r = c.post(
            url,
            json={"instances": digits_test.raw[:32].tolist()},
            headers={"Authorization": f"Bearer {stack.client_key}"},
        )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["probabilities"], reference_probs[:32], atol=1e-4)
