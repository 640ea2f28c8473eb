"""qumos.http11's transports keep httpx's contract: the request arrives intact, answers
in every framing come back whole, kept-alive connections are reused (and a stale one is
replaced once), and each network failure surfaces as the httpx exception the callers'
error handling expects. Both the asyncio transport (the orchestrator) and the blocking
one (qumos.client.make_client) run every case. Real sockets on loopback only."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from qumos.http11 import AsyncTransport, SyncTransport

BODY = b'{"ok": true}'
OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


class Server:
    """An asyncio server on loopback running `handler(reader, writer)` per connection,
    in its own thread and loop (so blocking clients can call it); counts connections."""

    def __init__(self, handler):
        import threading

        self.handler, self.connections, self.tasks = handler, 0, set()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start():
            async def counted(reader, writer):
                self.connections += 1
                self.tasks.add(asyncio.current_task())
                try:
                    await self.handler(reader, writer)
                except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                    pass
                finally:
                    writer.close()
                    self.tasks.discard(asyncio.current_task())

            self.server = await asyncio.start_server(counted, "127.0.0.1", 0)
            self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
            ready.set()

        self.thread = threading.Thread(
            target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
            daemon=True,
        )
        self.thread.start()
        ready.wait(10)

    def close(self):
        async def shutdown():
            self.server.close()
            for t in list(self.tasks):
                t.cancel()
            await asyncio.sleep(0.05)  # let the handlers close their connections

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def read_request(reader) -> tuple[str, dict, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return lines[0], headers, body


async def keep_alive(reader, writer, answer=OK):
    while True:
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(answer)
        await writer.drain()


def request(kind, url, method="GET", timeout=5.0, n=1, **kw):
    """n requests through one client of `kind` ("async" or "sync"); the responses."""
    if kind == "sync":
        with httpx.Client(transport=SyncTransport(), timeout=timeout) as c:
            return [c.request(method, url, **kw) for _ in range(n)]

    async def main():
        async with httpx.AsyncClient(transport=AsyncTransport(), timeout=timeout) as c:
            return [await c.request(method, url, **kw) for _ in range(n)]

    return asyncio.run(main())


KINDS = ["async", "sync"]


@pytest.fixture
def serve():
    servers = []

    def start(handler):
        servers.append(Server(handler))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.mark.parametrize("kind", KINDS)
def test_request_and_response_pass_through(kind, serve):
    seen = {}

    async def handler(reader, writer):
        seen["line"], seen["headers"], seen["body"] = await read_request(reader)
        writer.write(
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
            b"X-Extra: 1\r\nContent-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
        )
        await writer.drain()

    s = serve(handler)
    [r] = request(
        kind,
        s.url + "/v1/x?y=1",
        "POST",
        content=b'{"inputs": [[1.0]]}',
        headers={"Authorization": "Bearer t0ken"},
    )
    assert r.status_code == 201 and r.json() == {"ok": True}
    assert r.headers["x-extra"] == "1"
    assert seen["line"] == "POST /v1/x?y=1 HTTP/1.1"
    assert seen["headers"]["authorization"] == "Bearer t0ken"
    assert seen["headers"]["host"] == s.url.removeprefix("http://")
    assert seen["body"] == b'{"inputs": [[1.0]]}'


@pytest.mark.parametrize("kind", KINDS)
def test_connection_is_kept_alive_and_reused(kind, serve):
    """Five calls, one connection (httptools only reports keep-alive inside its
    message-complete callback; reading it later says "close" and costs a connect per call)."""
    s = serve(keep_alive)
    rs = request(kind, s.url + "/", "POST", content=b"x", n=5)
    assert [r.status_code for r in rs] == [200] * 5
    assert s.connections == 1


@pytest.mark.parametrize("kind", KINDS)
def test_connection_close_is_honoured(kind, serve):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    s = serve(handler)
    rs = request(kind, s.url + "/", n=3)
    assert [r.text for r in rs] == ["ok"] * 3
    assert s.connections == 3


@pytest.mark.parametrize("kind", KINDS)
def test_stale_kept_alive_connection_is_replaced_once(kind, serve):
    """The server answers, keeps the connection open a moment, then closes it while idle
    (as uvicorn does after its keep-alive timeout): the next call goes through on a new
    connection instead of failing."""

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)  # then close: the client still holds it as idle

    s = serve(handler)
    if kind == "sync":
        import time

        with httpx.Client(transport=SyncTransport(), timeout=5) as c:
            first = c.get(s.url)
            time.sleep(0.3)
            second = c.get(s.url)
    else:

        async def main():
            async with httpx.AsyncClient(transport=AsyncTransport(), timeout=5) as c:
                first = await c.get(s.url)
                await asyncio.sleep(0.3)
                return first, await c.get(s.url)

        first, second = asyncio.run(main())
    assert first.json() == second.json() == {"ok": True}
    assert s.connections == 2


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_and_read_until_close_answers(kind, serve):
    async def chunked(reader, writer):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        await writer.drain()
        await keep_alive(reader, writer)

    async def until_close(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        await writer.drain()

    s = serve(chunked)
    assert [r.text for r in request(kind, s.url, n=2)] == ["hello world", '{"ok": true}']
    assert s.connections == 1
    s2 = serve(until_close)
    assert [r.text for r in request(kind, s2.url, n=2)] == ["all of it"] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_refused_connection_is_connect_error(kind):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        request(kind, f"http://127.0.0.1:{port}/")


@pytest.mark.parametrize("kind", KINDS)
def test_full_accept_queue_is_connect_timeout(kind):
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
        try:
            with pytest.raises(httpx.ConnectTimeout):
                request(kind, f"http://127.0.0.1:{port}/", timeout=httpx.Timeout(5, connect=0.3))
        finally:
            for f in fillers:
                f.close()


@pytest.mark.parametrize("kind", KINDS)
def test_silent_server_is_read_timeout(kind, serve):
    async def handler(reader, writer):
        await asyncio.sleep(3)

    s = serve(handler)
    with pytest.raises(httpx.ReadTimeout):
        request(kind, s.url, timeout=httpx.Timeout(0.3))


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",  # cut off, then closed
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)  # garbled
@pytest.mark.parametrize("kind", KINDS)
def test_broken_answer_is_protocol_error(kind, answer, serve):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    s = serve(handler)
    with pytest.raises(httpx.RemoteProtocolError):
        request(kind, s.url)
    assert s.connections == 1  # a fresh connection that broke: not sent again


@pytest.mark.parametrize("kind", KINDS)
def test_unsupported_scheme(kind):
    with pytest.raises(httpx.UnsupportedProtocol):
        request(kind, "ftp://127.0.0.1/x")


def test_pool_limit_waits_then_times_out(serve):
    """max_per_host=1: a second concurrent call waits for the first's connection, and
    gives PoolTimeout if it stays busy longer than the pool timeout."""

    async def slow(reader, writer):
        await read_request(reader)
        await asyncio.sleep(0.5)
        writer.write(OK)
        await writer.drain()
        await keep_alive(reader, writer)

    s = serve(slow)

    async def main(pool_timeout):
        async with httpx.AsyncClient(
            transport=AsyncTransport(max_per_host=1), timeout=httpx.Timeout(5, pool=pool_timeout)
        ) as c:
            return await asyncio.gather(c.get(s.url), c.get(s.url), return_exceptions=True)

    ok = asyncio.run(main(5))
    assert [r.status_code for r in ok] == [200, 200]
    assert s.connections == 1  # the second waited for the first's connection
    res = asyncio.run(main(0.1))
    assert sum(isinstance(r, httpx.PoolTimeout) for r in res) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_oversized_answer_is_refused(kind, serve):
    """A server that streams more than max_answer_bytes gets RemoteProtocolError, not our
    memory."""

    async def flood(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        for _ in range(100):
            writer.write(b"x" * 65536)
            await writer.drain()

    s = serve(flood)
    make = SyncTransport if kind == "sync" else AsyncTransport
    transport = make(max_answer_bytes=100_000)
    if kind == "sync":
        with (
            httpx.Client(transport=transport, timeout=5) as c,
            pytest.raises(httpx.RemoteProtocolError, match="larger than 100000"),
        ):
            c.get(s.url)
        return

    async def main():
        async with httpx.AsyncClient(transport=transport, timeout=5) as c:
            await c.get(s.url)

    with pytest.raises(httpx.RemoteProtocolError, match="larger than 100000"):
        asyncio.run(main())
