"""The wire contract: the one validation-error formatter, the typed v2 tensors, and the
rule that nothing below qumos.wire imports numpy, qiskit, torch or a web framework."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError
from qumos.wire import (
    ExecuteRequest,
    V2InferRequest,
    describe_validation_error,
    format_validation_error,
)


def test_one_formatter_for_requests_and_designs():
    with pytest.raises(ValidationError) as e:
        ExecuteRequest.model_validate_json(b'{"inputs": [[1.0,')
    assert describe_validation_error(e.value)[0] == "body"  # not JSON at all
    with pytest.raises(ValidationError) as e:
        ExecuteRequest.model_validate({"inputs": [[1.0, float("nan"), "x"]], "colour": 1})
    field, msg = describe_validation_error(e.value)
    assert field == "inputs[0][1]"
    assert msg == "inputs[0][1]: is nan; every value must be a finite number (and 2 more errors)"
    assert format_validation_error(e.value) == (
        "inputs[0][1]: is nan; every value must be a finite number; inputs[0][2]: is 'x'; "
        "input should be a valid number; colour: unknown field"
    )


def test_v2_tensors_are_typed():
    t = {"name": "images", "shape": [1, 2], "datatype": "FP32"}
    assert V2InferRequest.model_validate({"inputs": [t | {"data": [1.0, 2]}]})
    assert V2InferRequest.model_validate({"inputs": [t | {"data": [[1.0, 2]]}]})
    assert V2InferRequest.model_validate(
        {
            "inputs": [t | {"parameters": {"binary_data_size": 8}}],
            "parameters": {"binary_data_output": True},
        }
    )
    for bad in (
        {"data": ["1", 2]},
        {"data": [True, 2]},
        {"parameters": {"colour": 1}},
        {"datatype": "INT32"},
    ):
        with pytest.raises(ValidationError):
            V2InferRequest.model_validate({"inputs": [t | bad]})


def test_nothing_heavy_below_the_wire_contract():
    code = (
        "import sys, qumos.wire, qumos.client, qumos.errors, qumos.config; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'numpy', 'qiskit', 'qiskit_aer', 'torch', 'fastapi', 'starlette', 'httpx'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"
