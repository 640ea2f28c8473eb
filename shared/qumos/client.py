"""The services' wire contract (pydantic models) and a small synchronous client.

Conventions (the same everywhere on the wire):
- Fragment inputs are angles in radians, `inputs` shape (B, n_inputs), row-major lists.
- Fragment outputs are Pauli-Z expectation values of qubits 0..n-1 (qiskit little-endian),
  shape (B, n_qubits), each in [-1, 1].
- Predict `instances` are raw flattened images (row-major pixel values, e.g. 64 values for
  an 8x8 digit); the orchestrator preprocesses them. Probabilities are (B, n_classes).
- Every value must be a finite JSON number: NaN, infinity, strings ("1.5") and booleans
  are refused with 422 naming the position; integers are typed strictly too.
- Errors are `{"error": {"type": ..., "message": ..., "field": ...}}` with a 4xx/5xx status.
- A fragment id is "<model>.<index>" (see `qumos.artifact.fragment_id`).

The services (services/provider, services/orchestrator) use these models for requests
and responses; the orchestrator also validates every provider answer with
`ExecuteResponse`, as untrusted input. `deploy_artifact` and `predict` below are what
`qumos deploy`, `qumos demo` and the tests use to talk to running services.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from qumos.errors import QumosError

if TYPE_CHECKING:
    import httpx

# Strict: a JSON number only (not "1.5", not true); an integer is a number too.
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
MAX_SHOTS = 1_000_000


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class OipErrorBody(BaseModel):
    """Errors under /v2 (Open Inference Protocol): the message, starting with the field."""

    error: str


# ----- provider ---------------------------------------------------------------------------
class ExecuteRequest(BaseModel):
    """POST /v1/fragments/{fragment_id}/execute"""

    model_config = ConfigDict(extra="forbid")

    inputs: list[list[FiniteFloat]] = Field(description="(B, n_inputs) angles in radians")
    shots: StrictInt | None = Field(None, ge=1, le=MAX_SHOTS,
                                    description="sample with this many shots; exact when absent")
    seed: StrictInt | None = Field(None, ge=0, le=2**32 - 1,
                                   description="sampler seed (shots only)")


class ExecuteResponse(BaseModel):
    """The provider's answer. The orchestrator validates it as untrusted input."""

    model_config = ConfigDict(extra="forbid")

    outputs: list[list[FiniteFloat]] = Field(description="(B, n_qubits) <Z_q> in [-1, 1]")
    provider: str
    fragment_id: str
    shots: int | None = None
    seconds: float = Field(description="simulator time for this batch")


class FragmentInfo(BaseModel):
    """GET /v1/fragments[/{id}]: what a provider holds (metadata, no weights)."""

    fragment_id: str
    model: str
    index: int
    n_qubits: int
    n_inputs: int
    block: str
    depth: int
    entanglement: str
    n_params: int
    transpiled_depth: int | None = None


class FragmentList(BaseModel):
    provider: str
    fragments: list[FragmentInfo]


# ----- orchestrator -----------------------------------------------------------------------
class PredictRequest(BaseModel):
    """POST /v1/models/{name}/predict"""

    model_config = ConfigDict(extra="forbid")

    instances: list[list[FiniteFloat]] = Field(
        description="(B, H*W) raw flattened images (pixel values, row-major), each pixel in "
        "the dataset's range [0, max_value] (digits 16, MNIST 255); others get 422")
    shots: StrictInt | None = Field(None, ge=1, le=MAX_SHOTS,
                                    description="providers sample with shots; exact when absent")
    seed: StrictInt | None = Field(None, ge=0, le=2**32 - 1000, description="sampler seed")


class PredictResponse(BaseModel):
    model: str
    probabilities: list[list[float]] | None = Field(
        None, description="under the model's output policy: all (probabilities), the k "
        "largest and zeros (top_k), possibly rounded; absent under the label policy")
    labels: list[int] = Field(description="predicted class labels (from the model's classes)")
    predictions: list[int] = Field(description="predicted class indices 0..C-1")


class ModelInfo(BaseModel):
    name: str
    dataset: str
    task: int
    classes: list[int]
    n_fragments: int
    placement: list[str]
    input_shape: list[int]
    canaries: int = Field(0, description="integrity canaries registered per fragment")
    output_policy: dict = Field(default_factory=lambda: {"kind": "probabilities"},
                                description="what clients see (qumos.defense.policy)")
    input_hiding: bool = Field(False, description="fragment 0 receives transformed angles")


# Integrity canaries: inputs with known outputs, mixed into every provider call.
MAX_CANARIES = 4096


class FragmentCanaries(BaseModel):
    """Canary rows for one fragment: inputs (N, n_inputs) and the expected outputs
    (N, n_qubits) computed by the company with the full model at deploy time."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[list[FiniteFloat]] = Field(min_length=1, max_length=MAX_CANARIES)
    outputs: list[list[FiniteFloat]] = Field(min_length=1, max_length=MAX_CANARIES)


class CanaryRequest(BaseModel):
    """PUT /v1/models/{name}/canaries (admin). The company's secret: the orchestrator mixes
    random canaries, at random positions, into each batch it sends to a provider and
    refuses (502) to answer when the provider's outputs for them are wrong."""

    model_config = ConfigDict(extra="forbid")

    fragments: list[FragmentCanaries] = Field(min_length=1, description="one per fragment")
    tolerance: float = Field(1e-6, gt=0, le=1, description="exact mode: largest allowed "
                             "|output - expected|")
    shots_z: float = Field(6.0, gt=0, le=50, description="shots mode: allowed deviation in "
                           "standard errors sqrt((1 - e^2) / shots), plus 1/shots")


# Open Inference Protocol v2 (KServe). The orchestrator parses infer requests itself
# (`qumos.oip`: JSON and binary tensor data); these models document the JSON contract.
class V2InputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["images"] = Field(description="the model's one input")
    shape: list[StrictInt] = Field(min_length=2, max_length=2,
                                   description="[batch, H*W]")
    datatype: Literal["FP32", "FP64"]
    data: list[Any] | None = Field(None, description="row-major numbers, flat or nested; "
                                   "absent with binary tensor data")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: bytes of "
                                              "this tensor after the JSON header")


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["probabilities", "labels"]
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true for "
                                              "binary tensor data")


class V2InferRequest(BaseModel):
    """POST /v2/models/{name}[/versions/1]/infer (JSON; or JSON + binary tensor data with
    the Inference-Header-Content-Length header)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="shots, seed (as in /v1 "
                                              "predict), binary_data_output")
    inputs: list[V2InputTensor] = Field(min_length=1, max_length=1)
    outputs: list[V2RequestedOutput] | None = Field(None, description="default: both")


class V2OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = Field(None, description="absent when sent as binary data")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[V2OutputTensor]


def format_loc(loc: tuple | list) -> str:
    """('body', 'inputs', 3, 2) -> 'inputs[3][2]'."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path") and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def describe_validation_error(e: ValidationError) -> tuple[str, str]:
    """(field, message) of the first error, e.g. ('inputs[0][3]', 'inputs[0][3]: ...')."""
    err = e.errors()[0]
    loc = err.get("loc", ())
    if err.get("type") == "json_invalid":
        return "body", f"body: not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})"
    field = format_loc(loc)
    msg = err["msg"]
    if err.get("type") == "finite_number":
        msg = f"is {err.get('input')}; every value must be a finite number"
    more = len(e.errors()) - 1
    return field, f"{field}: {msg}" + (f" (and {more} more errors)" if more > 0 else "")


def dump_json(obj) -> bytes:
    """The wire format of every large batch (predict bodies, provider calls and answers,
    access-log lines): JSON bytes of plain data with numpy arrays in it, by orjson (large
    float batches serialise ~10x faster than with the json module; floats round-trip
    exactly)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


# ----- a small synchronous client ---------------------------------------------------------
class ServiceError(QumosError):
    """A service answered with an error (status and its JSON error body)."""

    def __init__(self, status: int, body: Any, url: str):
        self.status, self.body, self.url = status, body, url
        msg = body.get("error", {}).get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"{url}: HTTP {status}: {msg}")


def _check(resp) -> Any:
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    if resp.status_code >= 400:
        raise ServiceError(resp.status_code, body, str(resp.request.url))
    return body


def read_token(path: Path | str) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"{path}: empty token file")
    return token


def make_canaries(spec, images, tolerance: float = 1e-6) -> CanaryRequest:
    """Canaries for every fragment from raw `images` (N, H*W), computed with the full model
    (all fragment parameters: only the company can do this). Fragment k's canary inputs are
    what fragment k really receives for those images (preprocess, fragments, glue), so on
    the wire they look like real traffic; outputs are exact expectation values."""
    import numpy as np
    from qumos.chain import encode_inputs, glue_forward, preprocess
    from qumos.quantum import AerRunner, DeviceProfile

    feats = preprocess(np.asarray(images, dtype=float), spec.preprocess)
    x, frags = encode_inputs(spec, feats), []
    for k, frag in enumerate(spec.fragments):
        if frag.params is None:
            raise ValueError(f"fragments[{k}].params: canaries need the full model")
        y = AerRunner(frag, DeviceProfile()).run(x)
        frags.append(FragmentCanaries(inputs=x.tolist(), outputs=y.tolist()))
        if k < len(spec.glue):
            x = glue_forward(spec.glue[k], y, feats)
    return CanaryRequest(fragments=frags, tolerance=tolerance)


def canary_images(spec, n: int, seed: int | None = None):
    """`n` of the company's own training images (random, so each deployment's canaries
    differ; a provider cannot learn them from the code)."""
    import numpy as np
    from qumos.datasets import load_task

    raw = load_task(spec.dataset, spec.task, seed=0).train.raw
    rng = np.random.default_rng(seed)
    return raw[rng.choice(len(raw), size=min(n, len(raw)), replace=False)]


def deploy_artifact(artifact, orchestrator_url: str, admin_token: str,
                    providers: dict[str, str], tokens: dict[str, str],
                    timeout: float = 60.0, canaries: int = 64,
                    canary_seed: int | None = None) -> dict:
    """Push fragment k to provider placement[k] (with that provider's token), then register
    the company part (no fragment weights) with the orchestrator, then `canaries` integrity
    canaries per fragment (0: none)."""
    from qumos.artifact import Artifact

    assert isinstance(artifact, Artifact)
    spec = artifact.spec
    missing = [p for p in spec.placement if p not in providers]
    if missing:
        raise ValueError(f"providers: no URL for {missing}; the model is placed on "
                         f"{spec.placement}")
    missing = [p for p in spec.placement if p not in tokens]
    if missing:
        raise ValueError(f"tokens: no token for {missing}")
    deployed = []
    with make_client(timeout=timeout) as client:
        for k, name in enumerate(spec.placement):
            ff = artifact.fragment_file(k)
            url = f"{providers[name].rstrip('/')}/v1/fragments/{ff.fragment_id}"
            _check(client.put(url, content=ff.model_dump_json(),
                              headers={"Authorization": f"Bearer {tokens[name]}",
                                       "Content-Type": "application/json"}))
            deployed.append({"provider": name, "fragment_id": ff.fragment_id, "url": url})
        url = f"{orchestrator_url.rstrip('/')}/v1/models/{spec.name}"
        _check(client.put(url, content=artifact.company_spec().model_dump_json(),
                          headers={"Authorization": f"Bearer {admin_token}",
                                   "Content-Type": "application/json"}))
        if canaries > 0:
            req = make_canaries(spec, canary_images(spec, canaries, canary_seed))
            _check(client.put(f"{url}/canaries", content=req.model_dump_json(),
                              headers={"Authorization": f"Bearer {admin_token}",
                                       "Content-Type": "application/json"}))
    return {"model": spec.name, "fragments": deployed, "orchestrator": url,
            "canaries": canaries}


def create_key(orchestrator_url: str, admin_token: str, name: str, timeout: float = 30.0,
               **quota) -> dict:
    """POST /v1/keys (admin): {"key": ..., "id": ..., ...}; the key is shown only here."""
    with make_client(timeout=timeout) as client:
        return _check(client.post(f"{orchestrator_url.rstrip('/')}/v1/keys",
                                  json={"name": name, **quota},
                                  headers={"Authorization": f"Bearer {admin_token}"}))


def make_client(timeout: float = 30.0, **kwargs) -> httpx.Client:
    """An `httpx.Client` on the lean HTTP/1.1 transport (`qumos.http11.SyncTransport`):
    the same API, ~0.4 ms less per exchange than httpx's default transport
    (`bench/bench_http_floor.py`). Any `httpx.Client` works with the functions here; this
    one is what the CLI, the demo and the benchmarks use."""
    import httpx
    from qumos.http11 import SyncTransport

    return httpx.Client(transport=SyncTransport(), timeout=timeout, **kwargs)


def predict(client, orchestrator_url: str, model: str, instances, shots: int | None = None,
            seed: int | None = None, api_key: str | None = None) -> PredictResponse:
    """One predict call with an `httpx.Client`; raises ServiceError on an error status, and
    ValueError (naming the position) before sending instances that are ragged, not numbers,
    NaN or infinite. The body is encoded with orjson straight from a numpy array."""
    import numpy as np

    try:
        x = np.ascontiguousarray(instances, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"instances: not a (batch, features) array of numbers ({e})") from None
    if x.ndim != 2:
        raise ValueError(f"instances: shape {x.shape}; expected (batch, features)")
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):  # JSON has no NaN or infinity; the service would refuse them too
        i, j = bad[0]
        raise ValueError(f"instances[{i}][{j}]: is {x[i, j]}; every value must be a finite "
                         "number")
    body: dict[str, Any] = {"instances": x}
    if shots is not None:
        body["shots"] = shots
    if seed is not None:
        body["seed"] = seed
    headers = {"Content-Type": "application/json"}
    if api_key:  # else the client's own Authorization header (if any) goes
        headers["Authorization"] = f"Bearer {api_key}"
    resp = client.post(f"{orchestrator_url.rstrip('/')}/v1/models/{model}/predict",
                       content=dump_json(body), headers=headers)
    if resp.status_code >= 400:
        _check(resp)
    return PredictResponse.model_validate_json(resp.content)
