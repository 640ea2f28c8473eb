"""The services' wire contract: pydantic models, the one validation-error formatter, and
the JSON encoder of large batches (orjson). Nothing else: no numpy, qiskit, torch or web
framework is imported here (pydantic and orjson only), so a client, the CLI and every
service can share it.

Conventions (the same everywhere on the wire):
- Fragment inputs are angles in radians, `inputs` shape (B, n_inputs), row-major lists.
- Fragment outputs are Pauli-Z expectation values of qubits 0..n-1 (qiskit little-endian),
  shape (B, n_qubits), each in [-1, 1].
- Predict `instances` are raw flattened images (row-major pixel values, e.g. 64 values for
  an 8x8 digit); the orchestrator preprocesses them. Probabilities are (B, n_classes).
- Every value must be a finite JSON number: NaN, infinity, strings ("1.5") and booleans
  are refused with 422 naming the position; integers are typed strictly too.
- Errors are `{"error": {"type": ..., "message": ..., "field": ...}}` with a 4xx/5xx status
  (under /v2, the Open Inference Protocol's `{"error": "<message>"}`).
- A fragment id is "<model>.<index>".

The services use these models for requests and responses; the orchestrator also validates
every provider answer with `ExecuteResponse`, as untrusted input.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt

# Strict: a JSON number only (not "1.5", not true); an integer is a number too.
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
MAX_SHOTS = 1_000_000
MAX_PREDICT_SEED = 2**32 - 1000  # a predict seed; fragment k gets seed + k


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
    shots: StrictInt | None = Field(
        None, ge=1, le=MAX_SHOTS, description="sample with this many shots; exact when absent"
    )
    seed: StrictInt | None = Field(
        None, ge=0, le=2**32 - 1, description="sampler seed (shots only)"
    )


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
        "the dataset's range [0, max_value] (digits 16, MNIST 255); others get 422"
    )
    shots: StrictInt | None = Field(
        None, ge=1, le=MAX_SHOTS, description="providers sample with shots; exact when absent"
    )
    seed: StrictInt | None = Field(None, ge=0, le=MAX_PREDICT_SEED, description="sampler seed")


class PredictResponse(BaseModel):
    model: str
    probabilities: list[list[float]] | None = Field(
        None,
        description="under the model's output policy: all (probabilities), the k "
        "largest and zeros (top_k), possibly rounded; absent under the label policy",
    )
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
    output_policy: dict = Field(
        default_factory=lambda: {"kind": "probabilities"},
        description="what clients see (qumos.defense.policy)",
    )
    input_hiding: bool = Field(False, description="fragment 0 receives transformed angles")


class KeyCreateRequest(BaseModel):
    """POST /v1/keys (admin): a client API key and its quota."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="who the key is for (letters, digits, _ . @ -)")
    images_per_window: int | None = Field(None, ge=1, le=10**12)
    window_s: float = Field(60.0, gt=0, le=366 * 86400)
    images_total: int | None = Field(None, ge=1, le=10**15)


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
    tolerance: float = Field(
        1e-6, gt=0, le=1, description="exact mode: largest allowed |output - expected|"
    )
    shots_z: float = Field(
        6.0,
        gt=0,
        le=50,
        description="shots mode: allowed deviation in "
        "standard errors sqrt((1 - e^2) / shots), plus 1/shots",
    )


# Open Inference Protocol v2 (KServe). The orchestrator parses infer requests itself
# (`qumos.oip`: the binary tensor data extension puts raw bytes after the JSON, and the
# protocol's errors name the field in its own words); these models are the JSON contract,
# typed as strictly as that parser checks it.
class V2InputParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    binary_data_size: StrictInt | None = Field(
        None, ge=0, description="bytes of this tensor after the JSON header"
    )


class V2InputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["images"] = Field(description="the model's one input")
    shape: list[StrictInt] = Field(min_length=2, max_length=2, description="[batch, H*W]")
    datatype: Literal["FP32", "FP64"]
    data: list[FiniteFloat] | list[list[FiniteFloat]] | None = Field(
        None,
        description="row-major pixel values, flat or [batch][pixels]; absent with "
        "binary tensor data",
    )
    parameters: V2InputParameters | None = None


class V2OutputParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    binary_data: bool | None = Field(None, description="true: binary tensor data")


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["probabilities", "labels"]
    parameters: V2OutputParameters | None = None


class V2RequestParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shots: StrictInt | None = Field(None, ge=1, le=MAX_SHOTS, description="as in /v1 predict")
    seed: StrictInt | None = Field(None, ge=0, le=MAX_PREDICT_SEED, description="sampler seed")
    binary_data_output: bool | None = Field(None, description="every output as binary data")


class V2InferRequest(BaseModel):
    """POST /v2/models/{name}[/versions/1]/infer (JSON; or JSON + binary tensor data with
    the Inference-Header-Content-Length header)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: V2RequestParameters | None = None
    inputs: list[V2InputTensor] = Field(min_length=1, max_length=1)
    outputs: list[V2RequestedOutput] | None = Field(None, description="default: both")


class V2BinarySize(BaseModel):
    binary_data_size: int = Field(description="bytes of this tensor after the JSON header")


class V2OutputTensor(BaseModel):
    name: Literal["probabilities", "labels"]
    shape: list[int]
    datatype: Literal["FP64", "INT64"]
    data: list[float] | list[int] | None = Field(
        None, description="row-major; absent when sent as binary data"
    )
    parameters: V2BinarySize | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[V2OutputTensor]


# ----- validation errors: one formatter for the library, the CLI and the services --------
def format_loc(loc: tuple | list) -> str:
    """('body', 'inputs', 3, 2) -> 'inputs[3][2]'; ('fragments', 0, 'depth') ->
    'fragments[0].depth' (a leading body/query/path, FastAPI's, is dropped)."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path") and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


_FIELD_FIRST = re.compile(r"^([A-Za-z_][\w.\[\]]*) ((?:is|has) .*)$", re.DOTALL)
_TYPE_ERRORS = (
    "int_type",
    "int_parsing",
    "float_type",
    "float_parsing",
    "bool_type",
    "bool_parsing",
    "string_type",
)


def describe_problem(err: dict, prefix: str = "") -> tuple[str, str]:
    """One pydantic error (an item of `.errors()`) as (field, message) in one style:
    ('fragments[0].depth', 'is 0; allowed: 1 to 12'). `prefix` is where the validated
    object sits (e.g. 'fragments[0]')."""
    loc = format_loc(err.get("loc", ()))
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    kind, value = err.get("type"), err.get("input")
    if kind == "json_invalid":
        return "body", f"not valid JSON ({err.get('ctx', {}).get('error', msg)})"
    if kind == "finite_number":
        msg = f"is {value}; every value must be a finite number"
    elif kind == "literal_error":
        msg = f"is {value!r}; allowed: {err.get('ctx', {}).get('expected')}"
    elif kind == "missing":
        msg = "missing; this field is required"
    elif kind == "extra_forbidden":
        msg = "unknown field"
    elif kind in _TYPE_ERRORS and not isinstance(value, (dict, list)):
        msg = f"is {value!r}; {msg[0].lower() + msg[1:]}"
    # the validator's own message may name the field again: say it once
    last = str(err["loc"][-1]) if err.get("loc") else ""
    for dup in (f"{loc}: ", f"{last}: "):
        if loc and msg.startswith(dup):
            msg = msg[len(dup) :]
    m = _FIELD_FIRST.match(msg)
    if m and (not loc or m.group(1) == last):
        loc, msg = (m.group(1) if not loc else loc), m.group(2)
    loc = ".".join(p for p in (prefix, loc) if p).replace(".[", "[")
    return loc, msg


def format_validation_error(e: Exception, prefix: str = "") -> str:
    """Every problem of a pydantic ValidationError, one per `; `:
    `fragments[0].depth: is 0; allowed: 1 to 12` (a design, an artifact, a model spec)."""
    errors = getattr(e, "errors", None)
    if errors is None:
        return str(e)
    return "; ".join(
        f"{f}: {m}" if f else m for f, m in (describe_problem(err, prefix) for err in errors())
    )


def describe_validation_error(e: Exception) -> tuple[str, str]:
    """(field, message) of a request's first problem, the count of the others after it:
    ('inputs[0][3]', 'inputs[0][3]: is nan; every value must be a finite number (and 2
    more errors)'). Field 'body' when the problem is the whole body. Takes pydantic's
    ValidationError and FastAPI's RequestValidationError alike."""
    errors = e.errors()  # type: ignore[attr-defined]
    field, msg = describe_problem(errors[0])
    field = field or "body"
    more = len(errors) - 1
    return field, f"{field}: {msg}" + (f" (and {more} more errors)" if more > 0 else "")


def dump_json(obj) -> bytes:
    """The wire format of every large batch (predict bodies, provider calls and answers,
    access-log lines): JSON bytes of plain data with numpy arrays in it, by orjson (large
    float batches serialise ~10x faster than with the json module; floats round-trip
    exactly)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
