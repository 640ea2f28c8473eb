"""The orchestrator's aiohttp-backed httpx transport keeps httpx's contract: the request
arrives intact, and each network failure surfaces as the httpx exception the
orchestrator's error handling expects. Real sockets on loopback only."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from services.orchestrator.transport import AiohttpTransport


async def _serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _run(coro):
    return asyncio.run(coro)


def test_request_and_response_pass_through():
    seen = {}

    async def handler(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        seen["line"] = lines[0]
        hdrs = dict(line.split(": ", 1) for line in lines[1:] if line)
        seen["headers"] = {k.lower(): v for k, v in hdrs.items()}
        seen["body"] = await reader.readexactly(int(seen["headers"]["content-length"]))
        body = b'{"ok": true}'
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                     b"X-Extra: 1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                     + body)
        await writer.drain()
        writer.close()

    async def main():
        server, url = await _serve(handler)
        async with server, httpx.AsyncClient(transport=AiohttpTransport(), timeout=5) as c:
            r = await c.post(url + "/v1/x?y=1", content=b'{"inputs": [[1.0]]}',
                             headers={"Authorization": "Bearer t0ken"})
        return r

    r = _run(main())
    assert r.status_code == 201 and r.json() == {"ok": True}
    assert r.headers["x-extra"] == "1"
    assert seen["line"] == "POST /v1/x?y=1 HTTP/1.1"
    assert seen["headers"]["authorization"] == "Bearer t0ken"
    assert seen["body"] == b'{"inputs": [[1.0]]}'


def test_refused_connection_is_connect_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        async with httpx.AsyncClient(transport=AiohttpTransport(), timeout=5) as c:
            await c.get(f"http://127.0.0.1:{port}/")

    with pytest.raises(httpx.ConnectError):
        _run(main())


def test_full_accept_queue_is_connect_timeout():
    """A listener that never accepts: once its queue is full the kernel drops new SYNs,
    so the connection is never made (loopback only)."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        port = lst.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue (never accepted)
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)

        async def main():
            async with httpx.AsyncClient(transport=AiohttpTransport(),
                                         timeout=httpx.Timeout(5, connect=0.3)) as c:
                await c.get(f"http://127.0.0.1:{port}/")

        try:
            with pytest.raises(httpx.ConnectTimeout):
                _run(main())
        finally:
            for f in fillers:
                f.close()


def test_silent_server_is_read_timeout():
    async def handler(reader, writer):
        await asyncio.sleep(5)

    async def main():
        server, url = await _serve(handler)
        async with server, httpx.AsyncClient(transport=AiohttpTransport(),
                                             timeout=httpx.Timeout(0.3)) as c:
            await c.get(url)

    with pytest.raises(httpx.ReadTimeout):
        _run(main())


def test_dropped_connection_is_transport_error():
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        await writer.drain()
        writer.close()

    async def main():
        server, url = await _serve(handler)
        async with server, httpx.AsyncClient(transport=AiohttpTransport(), timeout=5) as c:
            await c.get(url)

    with pytest.raises(httpx.TransportError):
        _run(main())
