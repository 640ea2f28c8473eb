"""The orchestrator's calls to the providers: one pooled `httpx.AsyncClient`, each call
under a hard deadline, retried when it failed in a retryable way (connection, timeout,
5xx, 429/503 with Retry-After), every answer validated as untrusted input; and the
readiness probe (does each provider hold its fragment?). No canaries, no chain here."""

from __future__ import annotations

import asyncio
import logging

import anyio
import httpx
import numpy as np
from pydantic import ValidationError
from qumos.artifact import fragment_id
from qumos.errors import ServiceError
from qumos.http11 import AsyncTransport
from qumos.spec import ModelSpec
from qumos.wire import ExecuteResponse, describe_validation_error, dump_json

from services.orchestrator.settings import OrchestratorSettings

log = logging.getLogger("qumos.orchestrator")
OUTPUT_TOLERANCE = 1e-6  # provider outputs must lie in [-1 - tol, 1 + tol]
CONNECT_TIMEOUT_S = 5.0  # a new connection to a provider (capped by timeout_s)
MAX_CONNECTIONS, MAX_PER_PROVIDER = 64, 32  # the provider connection pool
READY_PROBE_S = 2.0  # readiness: how long a provider may take to say it holds a fragment
READY_CACHE_S = 1.0  # readiness: a model's probe result is reused this long


class ProviderFailure(Exception):
    """A provider call failed in a way worth retrying (connection, timeout, 5xx, 429)."""

    def __init__(self, status: int, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.retry_after = retry_after


class Providers:
    """The providers of QUMOS_ORCH_PROVIDERS, their tokens, and the pooled client
    (`open` in the lifespan, `close` at shutdown). `counters` are prometheus counters."""

    def __init__(self, settings: OrchestratorSettings, tokens: dict[str, str]):
        self.settings = settings
        self.urls = settings.provider_urls()
        self.tokens = tokens
        self.client: httpx.AsyncClient | None = None
        self.request_extensions: dict = {}  # {"timeout": the client's}, set with the client
        self._endpoints: dict[tuple[str, str], tuple[httpx.URL, list]] = {}
        self._readiness: dict[str, tuple[float, list[str]]] = {}  # model -> (time, problems)
        self.failures = None  # prometheus Counter by provider, set by the app

    def open(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        mounts: dict[str, httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        """The pooled client: `transport`/`mounts` replace the network (in-process tests);
        otherwise qumos.http11 (HTTP_TRANSPORT=qumos) or httpx's own httpcore."""
        t = self.settings.timeout_s
        if transport is None and mounts is None and self.settings.http_transport == "qumos":
            transport = AsyncTransport(max_per_host=MAX_PER_PROVIDER)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(t, connect=min(CONNECT_TIMEOUT_S, t)),
            # limits of httpx's own transport (HTTP_TRANSPORT=httpcore); qumos.http11
            # caps each provider at MAX_PER_PROVIDER connections itself
            limits=httpx.Limits(
                max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_PER_PROVIDER
            ),
            transport=transport,
            mounts=mounts,
        )
        self.request_extensions = {"timeout": self.client.timeout.as_dict()}

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def forget(self, model: str) -> None:
        """Drop a model's cached readiness (it was registered anew)."""
        self._readiness.pop(model, None)

    # ----- readiness ------------------------------------------------------------------------
    async def model_problems(self, spec: ModelSpec) -> list[str]:
        """Why `spec` cannot be served now (empty: it can): each provider must answer and
        hold its fragment. Probed concurrently, each within READY_PROBE_S; cached."""
        loop = asyncio.get_running_loop()
        hit = self._readiness.get(spec.name)
        if hit is not None and loop.time() - hit[0] < READY_CACHE_S:
            return hit[1]

        async def probe(k: int, provider: str) -> str | None:
            fid = fragment_id(spec.name, k)
            url = f"{self.urls[provider]}/v1/fragments/{fid}"
            try:
                async with asyncio.timeout(READY_PROBE_S):
                    resp = await self.client.get(url)
            except (TimeoutError, httpx.HTTPError) as e:
                return (
                    f"{provider} (fragment {fid}) is unreachable at "
                    f"{self.urls[provider]} ({type(e).__name__})"
                )
            if resp.status_code == 404:
                return f"{provider} does not hold fragment {fid} (deploy it)"
            if resp.status_code != 200:
                return f"{provider} (fragment {fid}) answered HTTP {resp.status_code}"
            return None

        found = await asyncio.gather(*(probe(k, p) for k, p in enumerate(spec.placement)))
        problems = [p for p in found if p]
        self._readiness[spec.name] = (loop.time(), problems)
        return problems

    # ----- one execute call -----------------------------------------------------------------
    async def execute(
        self, spec: ModelSpec, k: int, angles: np.ndarray, shots: int | None, seed: int | None
    ) -> np.ndarray:
        """Fragment k of `spec` on its provider for `angles` (B, n_inputs): the outputs
        (B, n_qubits), retried RETRIES times; ServiceError 502/503/504 naming the
        provider when it cannot be had."""
        provider = spec.placement[k]
        fid = fragment_id(spec.name, k)
        if provider not in self.urls:
            raise ServiceError(
                503,
                "provider_unavailable",
                f"provider {provider} (fragment {fid}) has no URL in QUMOS_ORCH_PROVIDERS",
                "provider",
            )
        body: dict = {"inputs": np.ascontiguousarray(angles, dtype=float)}
        if shots is not None:
            body["shots"] = shots
            if seed is not None:
                body["seed"] = seed + k
        payload = dump_json(body)
        n_out = spec.fragments[k].n_qubits

        attempts = self.settings.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return await self._call_once(provider, fid, payload, len(angles), n_out)
            except ProviderFailure as e:
                failure = e
            if attempt < attempts:  # a provider's Retry-After (capped), else 0.05 s, 0.1 s, ...
                await anyio.sleep(
                    min(failure.retry_after, self.settings.max_retry_after_s)
                    if failure.retry_after is not None
                    else min(0.05 * 2 ** (attempt - 1), 1.0)
                )
        if self.failures is not None:
            self.failures.labels(provider=provider).inc()
        msg = failure.message
        if self.settings.retries:
            msg += f" (after {attempts} attempts)"
        raise ServiceError(
            failure.status,
            failure.kind,
            msg,
            "provider",
            headers={"Retry-After": "1"} if failure.status == 503 else None,
        )

    def _endpoint(self, provider: str, fid: str) -> tuple[httpx.URL, list]:
        """The execute URL (parsed) and request headers for a fragment, made once."""
        hit = self._endpoints.get((provider, fid))
        if hit is None:
            url = httpx.URL(f"{self.urls[provider]}/v1/fragments/{fid}/execute")
            headers = [
                (b"Authorization", f"Bearer {self.tokens[provider]}".encode()),
                (b"Content-Type", b"application/json"),
            ]
            hit = self._endpoints[(provider, fid)] = (url, headers)
        return hit

    async def _call_once(
        self, provider: str, fid: str, body: bytes, n_rows: int, n_out: int
    ) -> np.ndarray:
        where = f"provider {provider} (fragment {fid})"
        url, headers = self._endpoint(provider, fid)
        # httpx.Request + send: the client's timeouts, without merging base URL, default
        # headers and cookies on every call (none are used); URL parsed once per fragment
        request = httpx.Request(
            "POST", url, content=body, headers=headers, extensions=self.request_extensions
        )
        timeout = self.settings.timeout_s
        try:
            async with asyncio.timeout(timeout):  # the whole call
                resp = await self.client.send(request)
        except httpx.ConnectTimeout:
            raise ProviderFailure(
                503,
                "provider_unavailable",
                f"{where} is unreachable at "
                f"{self.urls[provider]} (no connection within "
                f"{self.client.timeout.connect}s)",
            ) from None
        except TimeoutError:
            raise ProviderFailure(
                504, "provider_timeout", f"{where} did not answer within {timeout}s (deadline)"
            ) from None
        except httpx.TimeoutException as e:
            raise ProviderFailure(
                504,
                "provider_timeout",
                f"{where} did not answer within {timeout}s ({type(e).__name__})",
            ) from None
        except httpx.TransportError as e:
            raise ProviderFailure(
                503,
                "provider_unavailable",
                f"{where} is unreachable at {self.urls[provider]} ({type(e).__name__}: {e})",
            ) from None
        if resp.status_code in (429, 503) and "retry-after" in resp.headers:
            raise ProviderFailure(
                503,
                "provider_overloaded",
                f"{where} is overloaded (HTTP "
                f"{resp.status_code}, Retry-After {resp.headers['retry-after']}"
                f"): {_provider_message(resp)}",
                retry_after=_retry_after(resp),
            )
        if resp.status_code >= 500:
            raise ProviderFailure(
                503 if resp.status_code == 503 else 502,
                "provider_unavailable" if resp.status_code == 503 else "provider_error",
                f"{where} answered HTTP {resp.status_code}: {_provider_message(resp)}",
            )
        if resp.status_code != 200:
            # 4xx: our request or its configuration is wrong; retrying will not help.
            raise ServiceError(
                502,
                "provider_error",
                f"{where} refused the call with HTTP {resp.status_code}: {_provider_message(resp)}",
                "provider",
            )
        return validate_answer(resp.content, provider, fid, n_rows, n_out)


def validate_answer(content: bytes, provider: str, fid: str, n_rows: int, n_out: int) -> np.ndarray:
    """A provider's execute answer, as untrusted input: 502 naming it unless it is an
    ExecuteResponse from that provider for that fragment, of shape (n_rows, n_out), with
    values in [-1, 1]."""
    where = f"provider {provider} (fragment {fid})"

    def bad(why: str) -> ServiceError:
        return ServiceError(
            502, "bad_provider_answer", f"{where} sent an invalid answer: {why}", "provider"
        )

    try:
        ans = ExecuteResponse.model_validate_json(content)
    except ValidationError as e:
        raise bad(describe_validation_error(e)[1]) from None
    if ans.provider != provider or ans.fragment_id != fid:
        raise bad(f"it answered as {ans.provider!r} for {ans.fragment_id!r}")
    if len(ans.outputs) != n_rows or any(len(r) != n_out for r in ans.outputs):
        shape = (len(ans.outputs), {len(r) for r in ans.outputs})
        raise bad(f"outputs has shape {shape}; expected ({n_rows}, {n_out})")
    out = np.asarray(ans.outputs, dtype=float)
    if np.abs(out).max(initial=0.0) > 1 + OUTPUT_TOLERANCE:
        raise bad(
            f"outputs has value {float(np.abs(out).max())}; expectation values lie in [-1, 1]"
        )
    return np.clip(out, -1.0, 1.0)


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return max(0.0, float(resp.headers.get("retry-after", "")))
    except ValueError:
        return None


def _provider_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return resp.text[:200] or "(empty body)"
