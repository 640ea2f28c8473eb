"""Open Inference Protocol v2 (KServe / Triton) codec for the orchestrator: an infer request
in (JSON, or JSON plus binary tensor data), an infer response out. No web framework here;
`services/orchestrator/app.py` calls `parse_infer` and `encode_infer`.

What the orchestrator serves (docs/api.md has the whole contract):
- one input, `images`, FP32 or FP64, shape [batch, H*W] (raw pixels, row-major), as JSON
  `data` (flat or nested numbers; no strings, no booleans) or as binary tensor data
  (`parameters.binary_data_size`, little-endian, after the JSON header);
- outputs `probabilities` (FP64, [batch, classes]) and `labels` (INT64, [batch]); a request
  may list the ones it wants (`outputs`), each in JSON or binary (`parameters.binary_data`,
  or the request's `parameters.binary_data_output`);
- request parameters `shots` and `seed` (as in /v1 predict) and `binary_data_output`.

Binary tensor data extension: the header `Inference-Header-Content-Length: N` says the
body's first N bytes are the JSON; binary tensors follow, in the order of the tensors
that announce a `binary_data_size`. Answers with binary outputs carry the same header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from qumos.wire import MAX_PREDICT_SEED as MAX_SEED
from qumos.wire import MAX_SHOTS

HEADER = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]
INPUT_NAME = "images"
OUTPUTS = {"probabilities": "FP64", "labels": "INT64"}
INPUT_DTYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
FP32_MAX = float(np.finfo(np.float32).max)
REQUEST_PARAMETERS = ("shots", "seed", "binary_data_output")


class OipError(ValueError):
    """A request the protocol or this model refuses: the field, and what was wrong."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


@dataclass
class InferCall:
    images: np.ndarray  # (batch, n_raw) float64
    id: str | None = None
    shots: int | None = None
    seed: int | None = None
    outputs: list[tuple[str, bool]] = field(default_factory=list)  # (name, binary)
    explicit_outputs: bool = False  # the request listed its outputs


def restrict_outputs(call: InferCall, shows_probabilities: bool, policy: str) -> None:
    """The model's output policy on v2: under `label` the default outputs are the labels
    only, and asking for probabilities is refused (422 naming the output)."""
    if shows_probabilities:
        return
    for i, (name, _) in enumerate(call.outputs):
        if name == "probabilities" and call.explicit_outputs:
            raise OipError(
                f"outputs[{i}].name",
                f"'probabilities' is not served: this "
                f"model's output policy is {policy}; ask for 'labels'",
            )
    call.outputs = [(n, b) for n, b in call.outputs if n != "probabilities"]


def _obj(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise OipError(where, f"is {_kind(v)}; expected a JSON object")
    return v


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, str):
        return f"a string ({v[:40]!r})"
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    return "an array" if isinstance(v, list) else type(v).__name__


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise OipError(where, f"is {_kind(v)}; allowed: an integer from {lo} to {hi}")
    return v


def _flatten(data: Any, where: str) -> list:
    """Flat list of the numbers in (nested) `data`; strings, booleans, nulls refused."""
    out: list = []

    def walk(v: list, path: tuple) -> None:
        if len(path) > 4:
            raise OipError(
                where + "".join(f"[{p}]" for p in path),
                "nested too deep; send a flat array or [batch][pixels]",
            )
        for i, x in enumerate(v):
            if type(x) is float or type(x) is int:  # not bool (a subclass of int)
                out.append(x)
            elif isinstance(x, list):
                walk(x, path + (i,))
            else:
                raise OipError(
                    where + "".join(f"[{p}]" for p in path + (i,)),
                    f"is {_kind(x)}; every value must be a number",
                )

    if not isinstance(data, list):
        raise OipError(where, f"is {_kind(data)}; expected an array of numbers")
    walk(data, ())
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """The JSON header (as a dict) and the binary part after it."""
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 < n <= len(body):
            raise OipError(
                "Inference-Header-Content-Length",
                f"is {header_length!r}; "
                f"allowed: the JSON header's size in bytes, 1 to {len(body)} "
                "(the body's length)",
            )
        json_part, binary = body[:n], memoryview(body)[n:]
    if not json_part:
        raise OipError("body", "empty; send a JSON inference request")
    try:
        req = orjson.loads(json_part)
    except orjson.JSONDecodeError as e:
        hint = (
            ""
            if header_length is not None
            else (" (binary tensor data needs the Inference-Header-Content-Length header)")
        )
        raise OipError("body", f"not valid JSON ({e}){hint}") from None
    return _obj(req, "body"), binary


def parse_infer(
    body: bytes,
    header_length: str | None,
    n_raw: int,
    max_batch: int,
    pixel_range: tuple[float, float] | None = None,
) -> InferCall:
    """Check an infer request for a model taking images of `n_raw` pixels; OipError names
    the first thing wrong. Pixels outside `pixel_range` (the dataset's) are refused."""
    req, binary = split_body(body, header_length)
    unknown = sorted(set(req) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise OipError(unknown[0], "unknown field; allowed: id, parameters, inputs, outputs")
    call = InferCall(images=np.zeros((0, n_raw)))
    if req.get("id") is not None:
        if not isinstance(req["id"], str):
            raise OipError("id", f"is {_kind(req['id'])}; allowed: a string")
        call.id = req["id"]
    params = _obj(req.get("parameters") or {}, "parameters")
    for key in params:
        if key not in REQUEST_PARAMETERS:
            raise OipError(
                f"parameters.{key}", "unknown parameter; allowed: " + ", ".join(REQUEST_PARAMETERS)
            )
    if params.get("shots") is not None:
        call.shots = _int(params["shots"], "parameters.shots", 1, MAX_SHOTS)
    if params.get("seed") is not None:
        call.seed = _int(params["seed"], "parameters.seed", 0, MAX_SEED)
    binary_all = params.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise OipError(
            "parameters.binary_data_output", f"is {_kind(binary_all)}; allowed: true or false"
        )

    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        got = f"{len(inputs)} tensors" if isinstance(inputs, list) else _kind(inputs)
        raise OipError("inputs", f"is {got}; send exactly one tensor, {INPUT_NAME!r}")
    call.images = _input(_obj(inputs[0], "inputs[0]"), binary, n_raw, max_batch, pixel_range)

    outputs = req.get("outputs")
    if outputs is None:
        call.outputs = [(name, binary_all) for name in OUTPUTS]
    else:
        call.explicit_outputs = True
        if not isinstance(outputs, list) or not outputs:
            raise OipError(
                "outputs",
                f"is {_kind(outputs)}; allowed: a non-empty array of "
                f"requested outputs, names {list(OUTPUTS)}",
            )
        for i, o in enumerate(outputs):
            o = _obj(o, f"outputs[{i}]")
            bad = sorted(set(o) - {"name", "parameters"})
            if bad:
                raise OipError(f"outputs[{i}].{bad[0]}", "unknown field; allowed: name, parameters")
            if o.get("name") not in OUTPUTS:
                raise OipError(
                    f"outputs[{i}].name",
                    f"is {_kind(o.get('name'))}, not an "
                    f"output of this model; allowed: {', '.join(OUTPUTS)}",
                )
            op = _obj(o.get("parameters") or {}, f"outputs[{i}].parameters")
            for key in op:
                if key != "binary_data":
                    raise OipError(
                        f"outputs[{i}].parameters.{key}", "unknown parameter; allowed: binary_data"
                    )
            b = op.get("binary_data", binary_all)
            if not isinstance(b, bool):
                raise OipError(
                    f"outputs[{i}].parameters.binary_data", f"is {_kind(b)}; allowed: true or false"
                )
            if any(name == o["name"] for name, _ in call.outputs):
                raise OipError(f"outputs[{i}].name", f"{o['name']!r} is requested twice")
            call.outputs.append((o["name"], b))
    return call


def _input(
    t: dict, binary: memoryview, n_raw: int, max_batch: int, pixel_range: tuple[float, float] | None
) -> np.ndarray:
    w = "inputs[0]"
    bad = sorted(set(t) - {"name", "shape", "datatype", "parameters", "data"})
    if bad:
        raise OipError(
            f"{w}.{bad[0]}", "unknown field; allowed: name, shape, datatype, parameters, data"
        )
    if t.get("name") != INPUT_NAME:
        raise OipError(
            f"{w}.name", f"is {_kind(t.get('name'))}; this model's input is {INPUT_NAME!r}"
        )
    dt = t.get("datatype")
    if dt not in INPUT_DTYPES:
        raise OipError(f"{w}.datatype", f"is {_kind(dt)}; allowed: {', '.join(INPUT_DTYPES)}")
    shape = t.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or any(not isinstance(s, int) or isinstance(s, bool) for s in shape)
        or shape[1] != n_raw
        or shape[0] < 1
    ):
        raise OipError(
            f"{w}.shape",
            f"is {orjson.dumps(shape).decode()[:80]}; expected "
            f"[batch, {n_raw}]: two integers, batch 1 to {max_batch}",
        )
    if shape[0] > max_batch:
        raise OipError(
            f"{w}.shape",
            f"batch {shape[0]}; allowed: at most {max_batch} images per call",
            status=413,
        )
    count = shape[0] * n_raw
    params = _obj(t.get("parameters") or {}, f"{w}.parameters")
    for key in params:
        if key != "binary_data_size":
            raise OipError(f"{w}.parameters.{key}", "unknown parameter; allowed: binary_data_size")
    size = params.get("binary_data_size")
    dtype = INPUT_DTYPES[dt]
    if size is not None:
        want = count * dtype.itemsize
        if "data" in t:
            raise OipError(
                f"{w}.data", "given with parameters.binary_data_size; send the values one way only"
            )
        _int(size, f"{w}.parameters.binary_data_size", want, want)
        if len(binary) != want:
            raise OipError(
                f"{w}.parameters.binary_data_size",
                f"is {size} but the body "
                f"holds {len(binary)} bytes of binary data after the JSON header",
            )
        arr = np.frombuffer(binary, dtype=dtype).astype(float)
    else:
        if "data" not in t:
            raise OipError(
                f"{w}.data",
                "missing; send the values as data, or as binary "
                "tensor data (parameters.binary_data_size)",
            )
        if len(binary):
            raise OipError(
                "body",
                f"{len(binary)} bytes after the JSON header, but no "
                "tensor announces binary_data_size",
            )
        values = _flatten(t["data"], f"{w}.data")
        if len(values) != count:
            raise OipError(f"{w}.data", f"has {len(values)} values; shape {shape} needs {count}")
        arr = np.asarray(values, dtype=float)
        if dt == "FP32":
            over = np.flatnonzero(np.abs(arr) > FP32_MAX)
            if len(over):
                raise OipError(
                    f"{w}.data[{over[0]}]",
                    f"is {values[over[0]]}, outside the "
                    f"FP32 range (|v| <= {FP32_MAX:.4g}); send FP64 or smaller values",
                )
    nonfinite = np.flatnonzero(~np.isfinite(arr))
    if len(nonfinite):
        raise OipError(
            f"{w}.data[{nonfinite[0]}]",
            f"is {arr[nonfinite[0]]}; every value must be a finite number",
        )
    images = arr.reshape(shape[0], n_raw)
    if pixel_range is not None:
        check_pixels(images, pixel_range, f"{w}.data", flat=True)
    return images


def check_pixels(
    images: np.ndarray, pixel_range: tuple[float, float], where: str, flat: bool = False
) -> None:
    """Refuse a pixel outside the dataset's range (OipError naming the first one)."""
    lo, hi = pixel_range
    bad = np.argwhere((images < lo) | (images > hi))
    if len(bad):
        i, j = (int(x) for x in bad[0])
        pos = f"[{i * images.shape[1] + j}]" if flat else f"[{i}][{j}]"
        raise OipError(
            f"{where}{pos}",
            f"is {images[i, j]:g}, outside this model's pixel "
            f"range [{lo:g}, {hi:g}] (the dataset's; scale the image to it)",
        )


def encode_infer(
    model: str, version: str, call: InferCall, probs: np.ndarray, labels: np.ndarray
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (the binary extension's when an output is binary)."""
    arrays = {
        "probabilities": np.ascontiguousarray(probs, dtype="<f8"),
        "labels": np.ascontiguousarray(labels, dtype="<i8"),
    }
    outs, blobs = [], []
    for name, binary in call.outputs:
        a = arrays[name]
        t: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name], "shape": list(a.shape)}
        if binary:
            blob = a.tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = a.reshape(-1)
        outs.append(t)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outs}
    if call.id is not None:
        head["id"] = call.id
    js = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return js, {"Content-Type": "application/json"}
    return js + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(js)),
    }
