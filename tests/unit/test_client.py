"""qumos.client without services: the transport setting, error answers as the one
ServiceError, and wait_ready's timeout naming what it waited for."""

from __future__ import annotations

import httpx
import pytest
from qumos.client import check_response, make_client, wait_ready
from qumos.errors import QumosError, ServiceError, StackError
from qumos.http11 import SyncTransport


def test_make_client_transport_is_one_setting_away(monkeypatch):
    with make_client() as c:
        assert isinstance(c._transport, SyncTransport)
    with make_client(transport="httpcore") as c:
        assert isinstance(c._transport, httpx.HTTPTransport)
    monkeypatch.setenv("QUMOS_HTTP_TRANSPORT", "httpcore")
    with make_client() as c:
        assert isinstance(c._transport, httpx.HTTPTransport)
    with pytest.raises(ValueError, match="transport"):
        make_client(transport="carrier-pigeon")


def _answer(status: int, body) -> httpx.Response:
    req = httpx.Request("POST", "http://svc/v1/x")
    if isinstance(body, str):
        return httpx.Response(status, text=body, request=req)
    return httpx.Response(status, json=body, request=req)


def test_error_answers_become_the_one_service_error():
    assert check_response(_answer(200, {"ok": 1})) == {"ok": 1}
    with pytest.raises(ServiceError) as e:
        check_response(
            _answer(
                422,
                {
                    "error": {
                        "type": "validation_error",
                        "message": "inputs[0]: bad",
                        "field": "inputs[0]",
                    }
                },
            )
        )
    err = e.value
    assert isinstance(err, QumosError)
    assert (err.status, err.status_code, err.type, err.field) == (
        422,
        422,
        "validation_error",
        "inputs[0]",
    )
    assert str(err) == "http://svc/v1/x: HTTP 422: inputs[0]: bad"
    with pytest.raises(ServiceError, match="HTTP 404: model: nope") as e:  # /v2's shape
        check_response(_answer(404, {"error": "model: nope"}))
    with pytest.raises(ServiceError, match="HTTP 502: Bad Gateway") as e:
        check_response(_answer(502, "Bad Gateway"))
    assert e.value.body == "Bad Gateway"


def test_wait_ready_names_what_it_waited_for():
    with pytest.raises(StackError, match=r"not ready after 0s: svc \(ConnectError.*\); see"):
        wait_ready(
            {"svc": "http://127.0.0.1:9"},
            timeout=0.3,
            poll=0.05,
            detail=lambda waiting: f"; see {waiting}",
        )
