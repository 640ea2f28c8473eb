"""A stock Open Inference Protocol v2 client (tritonclient.http) against the live
orchestrator: binary tensor data and JSON, sync and async_infer, requested outputs, errors,
metadata and readiness; probabilities equal to /v1 predict."""

from __future__ import annotations

import numpy as np
import pytest
from qumos.client import make_client, predict

pytestmark = pytest.mark.integration
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402 (after importorskip)


class _Keyed:
    """tritonclient sends headers per call: every infer carries the client API key."""

    def __init__(self, client, headers):
        self._c, self._h = client, headers

    def __getattr__(self, name):
        f = getattr(self._c, name)
        if name in ("infer", "async_infer"):
            return lambda *a, **kw: f(
                *a, headers={**self._h, **(kw.pop("headers", None) or {})}, **kw
            )
        return f


@pytest.fixture(scope="module")
def triton(stack):
    url = stack.orchestrator_url.removeprefix("http://")
    client = httpclient.InferenceServerClient(url=url, concurrency=2, network_timeout=120)
    yield _Keyed(client, {"Authorization": f"Bearer {stack.client_key}"})
    client.close()


@pytest.fixture(scope="module")
def v1(stack, digits_test):
    with make_client(timeout=120) as c:
        return predict(
            c, stack.orchestrator_url, "digits4", digits_test.raw[:32], api_key=stack.client_key
        )


def _inputs(raw, dtype="FP32", binary=True):
    t = httpclient.InferInput("images", list(raw.shape), dtype)
    t.set_data_from_numpy(
        raw.astype(np.float32 if dtype == "FP32" else np.float64), binary_data=binary
    )
    return [t]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_equals_v1_predict(triton, digits_test, v1, binary):
    raw = digits_test.raw[:32]
    want = np.asarray(v1.probabilities)
    outs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        httpclient.InferRequestedOutput("labels", binary_data=binary),
    ]
    res = triton.infer(
        "digits4", _inputs(raw, binary=binary), outputs=outs, model_version="1", request_id="r1"
    )
    np.testing.assert_allclose(res.as_numpy("probabilities"), want, rtol=0, atol=1e-12)
    assert res.as_numpy("labels").tolist() == v1.labels
    assert res.get_response()["id"] == "r1"
    # no outputs listed: tritonclient asks for every output in binary
    res = triton.infer("digits4", _inputs(raw, "FP64", binary=binary))
    np.testing.assert_allclose(res.as_numpy("probabilities"), want, rtol=0, atol=1e-12)
    # async_infer; only the labels asked for
    pending = triton.async_infer(
        "digits4",
        _inputs(raw, binary=binary),
        outputs=[httpclient.InferRequestedOutput("labels", binary_data=binary)],
    )
    res = pending.get_result(timeout=120)
    assert res.as_numpy("labels").tolist() == v1.labels
    assert res.as_numpy("probabilities") is None


def test_tritonclient_metadata_readiness_and_errors(triton, digits_test):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("digits4") and triton.is_model_ready("digits4", "1")
    assert not triton.is_model_ready("nope")
    meta = triton.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    assert triton.get_model_metadata("digits4", "1")["inputs"][0]["shape"] == [-1, 64]
    raw = digits_test.raw[:2]
    with pytest.raises(InferenceServerException) as e:
        triton.infer("digits4", _inputs(raw), outputs=[httpclient.InferRequestedOutput("logits")])
    assert e.value.status() == "422" and e.value.message().startswith("outputs[0].name:")
    assert "outputs[0].name" in str(e.value)  # the exception prints (the error is a string)
    bad = httpclient.InferInput("pixels", [2, 64], "FP32")
    bad.set_data_from_numpy(raw.astype(np.float32))
    with pytest.raises(InferenceServerException, match="inputs\\[0\\].name"):
        triton.infer("digits4", [bad])
    bad = httpclient.InferInput("images", [2, 64], "INT32")
    bad.set_data_from_numpy(raw.astype(np.int32))
    with pytest.raises(InferenceServerException, match="inputs\\[0\\].datatype.*FP32, FP64"):
        triton.infer("digits4", [bad])
    with pytest.raises(InferenceServerException, match="version"):
        triton.infer("digits4", _inputs(raw), model_version="7")
