"""Lean HTTP/1.1 transports for httpx: keep-alive connections, a C response parser.

httpx stays the API (timeouts, error types, `httpx.Response`); only the layer that talks
to the socket is replaced. httpx's own transport (httpcore + h11, pure Python) and aiohttp
behind httpx each cost ~0.4 ms per exchange on loopback on our 2-core machine; these
transports write the request with one `send`, keep connections alive and parse answers
with httptools (llhttp, the parser uvicorn uses): `python bench/bench_http_floor.py`
measured an exchange with a FastAPI route at 0.59 ms p50 through `SyncTransport`
against 0.95 ms through httpx's default. A prediction makes four sequential exchanges
(client -> orchestrator -> three providers); `bench/bench_chain.py` measured a batch-1
prediction 4 ms (12 %) slower with the orchestrator on httpx's own transport
(docs/performance.md), which stays one setting away (HTTP_TRANSPORT=httpcore).

    httpx.Client(transport=SyncTransport(), timeout=30)          # qumos.client.make_client
    httpx.AsyncClient(transport=AsyncTransport(max_per_host=32))  # the orchestrator

What they do, and do not:
- http:// and https:// (TLS with the default verified context); HTTP/1.1 only, one
  request at a time per connection, idle connections kept per host and reused;
- bodies are sent whole with Content-Length (a streamed request body is read first);
  answers with Content-Length, chunked, or until close are read whole (no streaming);
- timeouts: `connect` for making a connection, `pool` for waiting for a free connection
  (async only), `read` for the whole answer after the request is written;
- failures raise httpx's exceptions: ConnectError, ConnectTimeout, ReadTimeout,
  PoolTimeout, RemoteProtocolError (closed, garbled, or over `max_answer_bytes`, default
  64 MiB: an answer is held in memory whole), UnsupportedProtocol;
- a kept-alive connection that the server had already closed (it may close idle ones at
  any time) is detected at reuse: when it yields not a single byte, the request is sent
  once more on a new connection. Only do this with idempotent calls -- every QuMoS call
  is (execute, predict, deploy by PUT, ...).
No proxies, no HTTP/2, no 100-continue, no upgrades.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections import defaultdict

import httptools
import httpx

__all__ = ["SyncTransport", "AsyncTransport"]

_DROP = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}
_Key = tuple[str, str, int]
MAX_ANSWER_BYTES = 64 * 2**20  # a bigger answer is refused (a provider cannot flood us)


class _Dropped(Exception):
    """The connection ended before a complete answer; `got` = bytes received."""

    def __init__(self, got: int, why: str):
        super().__init__(why)
        self.got = got


class _Answer:
    """httptools callbacks for one response (a fresh parser per request)."""

    def __init__(self, method: str, max_bytes: int):
        self.max_bytes = max_bytes
        self.parser = httptools.HttpResponseParser(self)
        self.head = method == "HEAD"
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = self.headers_done = False
        self.reusable = False
        self.got = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        if self.head:  # no body follows, whatever Content-Length says
            self.done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True
        self.reusable = self.parser.should_keep_alive()  # only valid inside this callback

    def feed(self, data: bytes) -> None:
        self.got += len(data)
        if self.done:
            return
        if self.got > self.max_bytes:
            raise httpx.RemoteProtocolError(f"answer larger than {self.max_bytes} bytes "
                                            "(max_answer_bytes)")
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            raise httpx.RemoteProtocolError(f"malformed HTTP answer ({e})") from None

    def eof(self) -> bool:
        """The peer closed. True if that completes the answer: a body without length or
        chunking runs until the close (httptools has no call for that end)."""
        if not self.done and self.headers_done:
            names = {k.lower() for k, _ in self.headers}
            self.done = not names & {b"content-length", b"transfer-encoding"}
        return self.done

    def keep_alive(self) -> bool:
        return self.done and self.reusable and not self.head

    def response(self) -> httpx.Response:
        return httpx.Response(self.parser.get_status_code(), headers=self.headers,
                              content=b"".join(self.body),
                              extensions={"http_version": b"HTTP/1.1"})


def _request_bytes(request: httpx.Request, body: bytes) -> bytes:
    target = request.url.raw_path  # path and query, already encoded
    lines = [request.method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    lines += [k + b": " + v for k, v in request.headers.raw if k.lower() not in _DROP]
    if body or request.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(b"Content-Length: " + str(len(body)).encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _key(request: httpx.Request) -> _Key:
    url = request.url
    if url.scheme not in ("http", "https"):
        raise httpx.UnsupportedProtocol(f"{url.scheme!r} URLs are not supported; "
                                        "use http:// or https://", request=request)
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


def _timeouts(request: httpx.Request) -> tuple[float | None, float | None, float | None]:
    t = request.extensions.get("timeout", {})
    return t.get("connect"), t.get("read"), t.get("pool")


def _ssl_context(scheme: str, ctx: ssl.SSLContext | None) -> ssl.SSLContext | None:
    if scheme != "https":
        return None
    return ctx or ssl.create_default_context()


# ----- blocking ------------------------------------------------------------------------------
class _SyncConn:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def exchange(self, data: bytes, method: str, read_timeout: float | None,
                 max_bytes: int) -> _Answer:
        ans = _Answer(method, max_bytes)
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise _Dropped(0, f"send failed ({e})") from None
        deadline = None if read_timeout is None else time.monotonic() + read_timeout
        while not ans.done:
            left = None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise httpx.ReadTimeout(f"no complete answer within {read_timeout}s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(262144)
            except TimeoutError:
                raise httpx.ReadTimeout(f"no complete answer within {read_timeout}s") from None
            except OSError as e:
                raise _Dropped(ans.got, f"receive failed ({e})") from None
            if not chunk:
                if ans.eof():
                    break
                raise _Dropped(ans.got, "the server closed the connection")
            ans.feed(chunk)
        return ans

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class SyncTransport(httpx.BaseTransport):
    """For `httpx.Client`. Thread-safe: threads sharing the client get their own connections
    (the idle pool is shared under a lock)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, max_idle_per_host: int = 8,
                 max_answer_bytes: int = MAX_ANSWER_BYTES):
        self._ssl = ssl_context
        self._max_answer = max_answer_bytes
        self._max_idle = max_idle_per_host
        self._idle: dict[_Key, list[_SyncConn]] = defaultdict(list)
        self._lock = threading.Lock()

    def _connect(self, key: _Key, timeout: float | None) -> _SyncConn:
        scheme, host, port = key
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} within "
                                       f"{timeout}s") from None
        except OSError as e:
            raise httpx.ConnectError(f"cannot connect to {host}:{port} ({e})") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = _ssl_context(scheme, self._ssl)
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(sock, server_hostname=host)
            except (OSError, ssl.SSLError) as e:
                sock.close()
                raise httpx.ConnectError(f"TLS with {host}:{port} failed ({e})") from None
        return _SyncConn(sock)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        key = _key(request)
        connect_t, read_t, _ = _timeouts(request)
        data = _request_bytes(request, request.read())
        for attempt in (0, 1):
            with self._lock:
                conn = self._idle[key].pop() if self._idle[key] else None
            reused = conn is not None
            if conn is None:
                conn = self._connect(key, connect_t)
            try:
                ans = conn.exchange(data, request.method, read_t, self._max_answer)
            except _Dropped as e:
                conn.close()
                if reused and not e.got and attempt == 0:
                    continue  # a stale kept-alive connection: once more on a new one
                raise httpx.RemoteProtocolError(f"{key[1]}:{key[2]}: {e}") from None
            except BaseException:
                conn.close()
                raise
            if ans.keep_alive():
                with self._lock:
                    if len(self._idle[key]) < self._max_idle:
                        self._idle[key].append(conn)
                        conn = None
            if conn is not None:
                conn.close()
            return ans.response()
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for c in conns:
            c.close()


# ----- asyncio -------------------------------------------------------------------------------
class _AsyncConn(asyncio.Protocol):
    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.answer: _Answer | None = None
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        ans, w = self.answer, self.waiter
        if ans is None or w is None or w.done():
            self.close()  # bytes nobody asked for: this connection is not usable
            return
        try:
            ans.feed(data)
        except httpx.RemoteProtocolError as e:
            w.set_exception(e)
            return
        if ans.done:
            w.set_result(ans)

    def eof_received(self):
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        self.closed = True
        ans, w = self.answer, self.waiter
        if w is not None and not w.done():
            if ans is not None and ans.eof():
                w.set_result(ans)
            else:
                w.set_exception(_Dropped(ans.got if ans else 0, "the server closed the "
                                         "connection" + (f" ({exc})" if exc else "")))

    async def exchange(self, data: bytes, method: str, read_timeout: float | None,
                       max_bytes: int) -> _Answer:
        if self.closed:
            raise _Dropped(0, "the connection was closed")
        loop = asyncio.get_running_loop()
        self.answer = _Answer(method, max_bytes)
        self.waiter = waiter = loop.create_future()
        assert self.transport is not None  # set by connection_made
        self.transport.write(data)
        timer = None
        if read_timeout is not None:  # a timer handle: lighter than asyncio.wait_for
            timer = loop.call_later(read_timeout, _expire, waiter, httpx.ReadTimeout(
                f"no complete answer within {read_timeout}s"))
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self.answer = self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future, exc: Exception) -> None:
    if not waiter.done():
        waiter.set_exception(exc)


class AsyncTransport(httpx.AsyncBaseTransport):
    """For `httpx.AsyncClient`. At most `max_per_host` connections per host in use at once
    (more requests wait, up to the `pool` timeout); idle ones are kept for reuse. Made and
    used in one event loop."""

    def __init__(self, max_per_host: int = 32, ssl_context: ssl.SSLContext | None = None,
                 max_answer_bytes: int = MAX_ANSWER_BYTES):
        self._max_answer = max_answer_bytes
        self._max = max_per_host
        self._ssl = ssl_context
        self._idle: dict[_Key, list[_AsyncConn]] = defaultdict(list)
        self._slots: dict[_Key, asyncio.Semaphore] = {}

    async def _connect(self, key: _Key, timeout: float | None) -> _AsyncConn:
        scheme, host, port = key
        ctx = _ssl_context(scheme, self._ssl)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                _AsyncConn, host, port, ssl=ctx, server_hostname=host if ctx else None),
                timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} within "
                                       f"{timeout}s") from None
        except (OSError, ssl.SSLError) as e:
            raise httpx.ConnectError(f"cannot connect to {host}:{port} ({e})") from None
        return conn

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        key = _key(request)
        connect_t, read_t, pool_t = _timeouts(request)
        data = _request_bytes(request, await request.aread())
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(self._max)
        try:
            if slots.locked():  # all busy: wait (bounded); else take one without suspending
                await asyncio.wait_for(slots.acquire(), pool_t)
            else:
                await slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout(f"all {self._max} connections to {key[1]}:{key[2]} "
                                    f"stayed busy for {pool_t}s") from None
        try:
            for attempt in (0, 1):
                idle = self._idle[key]
                conn = None
                while idle and conn is None:
                    c = idle.pop()
                    conn = None if c.closed else c
                reused = conn is not None
                if conn is None:
                    conn = await self._connect(key, connect_t)
                try:
                    ans = await conn.exchange(data, request.method, read_t,
                                              self._max_answer)
                except _Dropped as e:
                    conn.close()
                    if reused and not e.got and attempt == 0:
                        continue  # a stale kept-alive connection: once more on a new one
                    raise httpx.RemoteProtocolError(f"{key[1]}:{key[2]}: {e}") from None
                except BaseException:  # timeout, cancellation: the connection's state is unknown
                    conn.close()
                    raise
                if ans.keep_alive() and not conn.closed:
                    idle.append(conn)
                else:
                    conn.close()
                return ans.response()
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            slots.release()

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
