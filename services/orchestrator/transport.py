"""An httpx transport that sends through aiohttp's connection pool.

The orchestrator keeps one pooled `httpx.AsyncClient` (timeouts, retries and error
handling are written against httpx). httpx's own transport (httpcore) costs about 1.6 ms
of CPU per call on loopback here -- it writes headers and body as two separate socket
sends, and more per call -- while aiohttp costs about 0.3 ms; through this transport an
httpx call costs about 0.8 ms (CPU per GET on loopback; README "Services" has the
numbers, and `bench/bench_chain.py --variants default,httpcore` the end-to-end effect). The contract of an httpx transport is
kept: httpx's per-request timeouts apply, and every aiohttp failure is raised as the
matching httpx exception (ConnectError, ReadTimeout, RemoteProtocolError, ...) so the
caller's handling does not change.

    httpx.AsyncClient(transport=AiohttpTransport(max_connections=64), timeout=...)
"""

from __future__ import annotations

import asyncio

import aiohttp
import httpx

_SKIP = {b"host", b"content-length", b"transfer-encoding", b"connection"}


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int = 64, max_per_host: int = 32):
        self._limits = (max_connections, max_per_host)
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # made on first use, inside the running event loop (aiohttp binds to it)
        if self._session is None or self._session.closed:
            # no DNS cache: a restarted provider container comes back under a new address
            # (and a killed one's name stops resolving: a fast ConnectError, not a timeout)
            conn = aiohttp.TCPConnector(limit=self._limits[0], limit_per_host=self._limits[1],
                                        use_dns_cache=False)
            self._session = aiohttp.ClientSession(connector=conn, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent",),
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        t = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=None, connect=t.get("pool"),
                                        sock_connect=t.get("connect"), sock_read=t.get("read"))
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in request.headers.raw if k.lower() not in _SKIP]
        body = await request.aread() if request.method not in ("GET", "HEAD") else None
        try:
            async with self._get_session().request(
                    request.method, str(request.url), headers=headers, data=body,
                    timeout=timeout, allow_redirects=False) as r:
                content = await r.read()
                return httpx.Response(r.status, headers=list(r.raw_headers), content=content,
                                      request=request, extensions={"http_version": b"HTTP/1.1"})
        except aiohttp.ConnectionTimeoutError as e:
            raise httpx.ConnectTimeout(str(e) or "connect timeout", request=request) from e
        except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as e:
            raise httpx.ReadTimeout(str(e) or "read timeout", request=request) from e
        except aiohttp.ClientConnectorError as e:
            raise httpx.ConnectError(str(e), request=request) from e
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                aiohttp.ClientResponseError) as e:
            raise httpx.RemoteProtocolError(str(e) or type(e).__name__, request=request) from e
        except (aiohttp.ClientError, OSError) as e:
            raise httpx.ReadError(str(e) or type(e).__name__, request=request) from e

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
