"""The orchestrator's Open Inference Protocol v2 (binary tensor data, requested outputs,
errors, versions, readiness) and the API rules fuzzing found (strict numbers, pixel range,
one name rule, 405 Allow), in-process."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from pydantic import ValidationError
from qumos.datasets import load_task
from qumos.spec import PreprocessSpec

from tests.support.services import company_stack, deploy_inprocess

pytestmark = pytest.mark.anyio
INFER = "/v2/models/digits4/infer"


@pytest.fixture(scope="module")
def raw():
    return load_task("digits", 4, seed=0).test.raw[:5]


def binary_request(images: np.ndarray, dtype: str = "FP32", outputs=None, **params):
    """What tritonclient sends in its default (binary) mode."""
    blob = images.astype("<f4" if dtype == "FP32" else "<f8").tobytes()
    head = {
        "inputs": [
            {
                "name": "images",
                "shape": list(images.shape),
                "datatype": dtype,
                "parameters": {"binary_data_size": len(blob)},
            }
        ]
    }
    if outputs is not None:
        head["outputs"] = outputs
    if params:
        head["parameters"] = params
    js = json.dumps(head).encode()
    return js + blob, {
        "Inference-Header-Content-Length": str(len(js)),
        "Content-Type": "application/octet-stream",
    }


def decode(resp) -> dict[str, np.ndarray]:
    n = resp.headers.get("inference-header-content-length")
    head = json.loads(resp.content[: int(n)] if n else resp.content)
    buf, at, out = resp.content[int(n) :] if n else b"", 0, {}
    for o in head["outputs"]:
        assert "parameters" not in o or o["parameters"] is not None  # never "parameters": null
        dt = {"FP64": "<f8", "INT64": "<i8"}[o["datatype"]]
        if "data" in o:
            out[o["name"]] = np.asarray(o["data"], dtype=dt).reshape(o["shape"])
        else:
            size = o["parameters"]["binary_data_size"]
            out[o["name"]] = np.frombuffer(buf[at : at + size], dtype=dt).reshape(o["shape"])
            at += size
    assert at == len(buf)
    return out


async def test_oip_binary_and_json_equal_v1_predict(tmp_path, artifact, raw):
    async with company_stack(tmp_path, artifact) as (c, admin, providers):
        await deploy_inprocess(c, admin, providers, artifact)
        v1 = (await c.post("/v1/models/digits4/predict", json={"instances": raw.tolist()})).json()
        want = np.array(v1["probabilities"])
        # binary in, binary out (no outputs listed + binary_data_output, as tritonclient)
        body, h = binary_request(raw, binary_data_output=True)
        r = await c.post(INFER, content=body, headers=h)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream"
        out = decode(r)
        np.testing.assert_allclose(out["probabilities"], want, atol=1e-12)
        assert out["labels"].tolist() == v1["labels"]
        # binary FP64 in, one output asked for, in JSON, on the version path
        body, h = binary_request(raw, "FP64", outputs=[{"name": "labels"}])
        r = await c.post("/v2/models/digits4/versions/1/infer", content=body, headers=h)
        assert r.status_code == 200, r.text
        assert [o["name"] for o in r.json()["outputs"]] == ["labels"]
        assert r.json()["outputs"][0] == {
            "name": "labels",
            "datatype": "INT64",
            "shape": [5],
            "data": v1["labels"],
        }
        # JSON in, probabilities only, binary
        r = await c.post(
            INFER,
            json={
                "id": "x",
                "inputs": [
                    {"name": "images", "shape": [5, 64], "datatype": "FP32", "data": raw.tolist()}
                ],
                "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
            },
        )
        out = decode(r)
        assert list(out) == ["probabilities"] and r.status_code == 200
        np.testing.assert_allclose(out["probabilities"], want, atol=1e-12)
        # server and model metadata, versions
        meta = (await c.get("/v2")).json()
        assert meta["name"] == "qumos-orchestrator" and "binary_tensor_data" in meta["extensions"]
        m1 = (await c.get("/v2/models/digits4/versions/1")).json()
        assert m1 == (await c.get("/v2/models/digits4")).json() and m1["versions"] == ["1"]
        r = await c.get("/v2/models/digits4/versions/2")
        assert r.status_code == 404 and r.json() == {
            "error": "version: '2' is not a version of this model; allowed: '1'"
        }
        assert (await c.get("/v2/models/digits4/versions/1/ready")).json() == {
            "name": "digits4",
            "ready": True,
        }


async def test_oip_refusals_name_the_field(tmp_path, artifact, raw):
    async with company_stack(tmp_path, artifact) as (c, admin, providers):
        await deploy_inprocess(c, admin, providers, artifact)
        t = {"name": "images", "shape": [1, 64], "datatype": "FP32", "data": raw[0].tolist()}

        async def refused(req, field, status=422, path=INFER, **kw):
            r = await c.post(path, **({"json": req} if req is not None else kw))
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert isinstance(err, str) and err.startswith(field + ":"), err
            return err

        msg = await refused({"inputs": [t], "outputs": [{"name": "logits"}]}, "outputs[0].name")
        assert "probabilities, labels" in msg
        await refused({"inputs": [t | {"name": "pixels"}]}, "inputs[0].name")
        assert "FP32, FP64" in await refused(
            {"inputs": [t | {"datatype": "INT32"}]}, "inputs[0].datatype"
        )
        await refused({"inputs": [t | {"shape": ["1", "64"]}]}, "inputs[0].shape")
        await refused({"inputs": [t | {"data": ["1"] * 64}]}, "inputs[0].data[0]")
        await refused({"inputs": [t | {"data": [True] + [0.0] * 63}]}, "inputs[0].data[0]")
        msg = await refused({"inputs": [t | {"data": [1e39] + [0.0] * 63}]}, "inputs[0].data[0]")
        assert "FP32" in msg
        await refused({"inputs": [t | {"data": [17.0] + [0.0] * 63}]}, "inputs[0].data[0]")
        await refused({"inputs": [t], "parameters": {"shots": 2**70}}, "parameters.shots")
        await refused({"inputs": [t], "parameters": {"colour": 1}}, "parameters.colour")
        await refused({"inputs": [t, t]}, "inputs")
        await refused({"inputs": [t]}, "model", status=404, path="/v2/models/nope/infer")
        body, h = binary_request(raw[:1])  # binary data without the header
        await refused(None, "body", content=body, headers={"Content-Type": "application/json"})
        h["Inference-Header-Content-Length"] = "9999999"
        await refused(None, "Inference-Header-Content-Length", content=body, headers=h)
        body, h = binary_request(raw[:1])
        await refused(None, "inputs[0].parameters.binary_data_size", content=body[:-4], headers=h)
        # the errors of the middleware keep the protocol's shape too
        r = await c.get("/v2/nothing")
        assert r.status_code == 404 and isinstance(r.json()["error"], str)
        # /v1 keeps its richer shape
        r = await c.post("/v1/models/digits4/predict", json={"instances": [["1"] * 64]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "instances[0][0]"
        r = await c.post("/v1/models/digits4/predict", json={"instances": [[False] * 64]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "instances[0][0]"
        r = await c.post(
            "/v1/models/digits4/predict", json={"instances": [[0.0] * 10 + [-1.0] + [0.0] * 53]}
        )
        assert r.status_code == 422 and r.json()["error"]["field"] == "instances[0][10]"
        assert "[0, 16]" in r.json()["error"]["message"]
        r = await c.post(
            "/v1/models/digits4/predict", json={"instances": [[0.0] * 64], "shots": "10"}
        )
        assert r.status_code == 422 and r.json()["error"]["field"] == "shots"


async def test_readiness_means_a_prediction_can_be_served(tmp_path, artifact, raw):
    async with company_stack(tmp_path, artifact) as (c, admin, providers):
        assert (await c.get("/readyz")).status_code == 200  # nothing registered yet
        # the model registered, its fragments not yet on the providers: not ready
        r = await c.put(
            "/v1/models/digits4",
            content=artifact.company_spec().model_dump_json(),
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert r.status_code == 201
        r = await c.get("/readyz")
        assert (
            r.status_code == 503
            and "provider-a does not hold fragment digits4.0" in r.json()["error"]["message"]
        )
        r = await c.get("/v2/health/ready")
        assert r.status_code == 503 and "digits4" in r.json()["error"]
        r = await c.get("/v2/models/digits4/ready")
        assert r.status_code == 503 and "provider-c" in r.json()["error"]
        await deploy_inprocess(c, admin, providers, artifact)  # re-registers: cache dropped
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.get("/v2/health/ready")).json() == {"ready": True}
        r = await c.post("/v1/models/digits4/predict", json={"instances": raw.tolist()})
        assert r.status_code == 200


@pytest.mark.parametrize("name", ["x\x00y", "n" * 300, "☃", "a b", "..", ".hidden", "-x"])
async def test_model_names_follow_the_providers_rule(tmp_path, artifact, name):
    from urllib.parse import quote

    async with company_stack(tmp_path, artifact) as (c, admin, _):
        body = artifact.company_spec().model_copy(update={"name": "ok"}).model_dump()
        body["name"] = name
        path = quote(name, safe="").replace(".", "%2E")  # so that no client drops "/.."
        r = await c.put(
            f"/v1/models/{path}",
            content=orjson.dumps(body),
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "name"
        assert "letters, digits" in r.json()["error"]["message"]
        assert (await c.get("/v1/models")).json() == {"models": []}


async def test_preprocess_ranges_are_422(tmp_path, artifact):
    with pytest.raises(ValidationError, match="pool_to is 0; allowed: 1 to 8"):
        PreprocessSpec(pool_to=0)
    with pytest.raises(ValidationError, match="max_value is 0.0"):
        PreprocessSpec(max_value=0)
    async with company_stack(tmp_path, artifact) as (c, admin, _):
        body = artifact.company_spec().model_dump()
        body["preprocess"]["pool_to"] = 0
        r = await c.put(
            "/v1/models/digits4", json=body, headers={"Authorization": f"Bearer {admin}"}
        )
        assert r.status_code == 422 and "pool_to is 0" in r.json()["error"]["message"]


async def test_405_allow_lists_every_method(tmp_path, artifact):
    async with company_stack(tmp_path, artifact) as (c, _, providers):
        r = await c.options("/v1/models/digits4")
        assert r.status_code == 405 and r.headers["allow"] == "GET, PUT"
        assert r.json()["error"]["message"].endswith("allowed: GET, PUT")
        r = await c.delete("/v1/models/digits4/predict")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        app = providers["provider-a"][0]
        import httpx

        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://p"
        ) as pc:
            r = await pc.options("/v1/fragments/digits4.0")
            assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PUT"


def test_health_probes_leave_no_access_log_lines():
    import logging

    from qumos.web.middleware import QuietHealthChecks

    def record(path, status):
        return logging.LogRecord(
            "uvicorn.access",
            logging.INFO,
            "",
            0,
            '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:5", "GET", path, "1.1", status),
            None,
        )

    f = QuietHealthChecks()
    assert not f.filter(record("/readyz", 200)) and not f.filter(record("/healthz", 200))
    assert f.filter(record("/readyz", 503))  # a failing probe is worth a line
    assert f.filter(record("/v1/models/x/predict", 200))
