"""The Streamable HTTP upstream: pooled keep-alive connections (`http_wire`) to the MCP server the sidecar fronts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson

from toolmesh.api.http_wire import WireError, WirePool, WireResponse
from toolmesh.api.mcp_http import SseEvent, iter_sse
from toolmesh.sidecar.errors import UpstreamTimeout, UpstreamUnavailable
from toolmesh.sidecar.transports.base import UpstreamResponse

log = logging.getLogger("toolmesh.sidecar.upstream")

# Response headers that describe one hop, or that aiohttp already undid (compression, chunking).
_NOT_RELAYED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "content-length", "content-encoding", "date", "server",
})

PROBE_PROTOCOL_VERSION = "2025-11-25"


def relayed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream response headers a client should see, from `http_wire`'s (whose names are lower-case)."""
    return {k: v for k, v in headers.items() if k not in _NOT_RELAYED}


class HttpUpstream:
    """An MCP server reached over Streamable HTTP at `url`."""

    def __init__(self, url: str, *, timeout: float = 300.0, connect_timeout: float = 5.0):
        self.url = url
        self._read_timeout = timeout
        self._connect_timeout = connect_timeout
        self._probe_timeout = aiohttp.ClientTimeout(total=min(timeout, 5.0), sock_connect=connect_timeout)
        self._wire: WirePool | None = None
        self._session: aiohttp.ClientSession | None = None
        self._draining: set[asyncio.Task] = set()
        """Background reads of answered streams' last bytes, so their connections can be reused."""

    async def start(self) -> None:
        self._wire = WirePool(self.url, connect_timeout=self._connect_timeout)
        # The readiness probe is rare and off the hot path: a general-purpose client is fine there. It opens a
        # fresh connection per probe: a pooled one would sit idle for exactly the probe interval, and a server
        # whose keep-alive timeout is as long (uvicorn's 5 s against the default 5 s interval) closes it just
        # as the next probe is written, which failed one probe in a few.
        self._session = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                                              connector=aiohttp.TCPConnector(force_close=True))

    async def close(self) -> None:
        for task in list(self._draining):
            task.cancel()
        if self._wire is not None:
            self._wire.close()
            self._wire = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, body: bytes, headers: Mapping[str, str], message: Any = None) -> UpstreamResponse:
        # A 2026-07-28 subscription stream, like the GET stream, may rightly stay silent for hours.
        timeout = None if b"subscriptions/listen" in body else self._read_timeout
        return await self._send("POST", headers, body, timeout)

    async def get(self, headers: Mapping[str, str]) -> UpstreamResponse:
        # The server stream (GET) may rightly stay silent for hours.
        return await self._send("GET", headers, None, None)

    async def delete(self, headers: Mapping[str, str]) -> UpstreamResponse:
        return await self._send("DELETE", headers, None, self._read_timeout)

    async def _send(self, method: str, headers: Mapping[str, str], body: bytes | None,
                    timeout: float | None) -> UpstreamResponse:
        wire = self._wire
        if wire is None:
            raise UpstreamUnavailable("upstream is not connected")
        try:
            resp = await wire.request(method, headers, body, timeout=timeout)
        except TimeoutError:
            raise UpstreamTimeout("upstream did not answer in time") from None
        except WireError as exc:
            raise UpstreamUnavailable(f"upstream unreachable: {exc}") from None
        out_headers = relayed_headers(resp.headers)
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            state = _StreamState()
            return UpstreamResponse(status=resp.status, headers=out_headers, events=_events(resp, state),
                                    release=_releaser(resp, state, self._draining))
        try:
            data = await resp.read()
        except TimeoutError:
            raise UpstreamTimeout("upstream did not finish its answer in time") from None
        except WireError as exc:
            raise UpstreamUnavailable(str(exc)) from None
        return UpstreamResponse(status=resp.status, headers=out_headers, body=data)

    async def probe(self) -> bool:
        """Initialize a throw-away session (ended at once); any JSON-RPC answer proves the server speaks MCP.

        A failure other than a timeout is tried once more on a fresh connection before it counts.
        """
        for attempt in (1, 2):
            try:
                return await self._probe_once()
            except asyncio.TimeoutError:
                return False
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                if attempt == 2:
                    log.debug("probe failed twice", extra={"event": "probe_error", "error": repr(exc)})
                    return False
        return False

    async def _probe_once(self) -> bool:
        session = self._session
        if session is None:
            return False
        body = orjson.dumps({
            "jsonrpc": "2.0", "id": "toolmesh-probe", "method": "initialize",
            "params": {"protocolVersion": PROBE_PROTOCOL_VERSION, "capabilities": {},
                       "clientInfo": {"name": "toolmesh-probe", "version": "1"}},
        })
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        async with session.post(self.url, data=body, headers=headers, timeout=self._probe_timeout) as resp:
            session_id = resp.headers.get("Mcp-Session-Id")
            answered = await _answers(resp, "toolmesh-probe")
        if session_id:
            end = {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": PROBE_PROTOCOL_VERSION}
            async with session.delete(self.url, headers=end, timeout=self._probe_timeout):
                pass
        return answered


async def _answers(resp: aiohttp.ClientResponse, request_id: str) -> bool:
    """True when `resp` carries a JSON-RPC response (result or error) to `request_id`."""
    if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        async for event in iter_sse(resp.content.iter_any()):
            if _is_answer(event.data, request_id):
                return True
        return False
    return _is_answer(await resp.read(), request_id)


def _is_answer(data: bytes, request_id: str) -> bool:
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(message, dict) and message.get("id") == request_id and ("result" in message or "error" in message)


class _StreamState:
    """What the relay last saw on an upstream stream, to decide what releasing it means."""

    __slots__ = ("answered",)

    def __init__(self) -> None:
        self.answered = False


async def _events(resp: WireResponse, state: _StreamState) -> AsyncIterator[SseEvent]:
    try:
        async for event in iter_sse(resp.chunks()):
            data = event.data
            # A JSON-RPC response (no "method"): on a POST stream the upstream ends the stream right after it.
            state.answered = b'"method"' not in data and (b'"result"' in data or b'"error"' in data)
            yield event
    except TimeoutError:
        raise UpstreamTimeout("upstream went silent for longer than the upstream timeout") from None
    except WireError as exc:
        raise UpstreamUnavailable(str(exc)) from None
    except ValueError as exc:
        raise UpstreamUnavailable(f"upstream sent a broken stream: {exc}") from None


_DRAIN_SECONDS = 1.0
_DRAIN_BYTES = 64 * 1024


def _releaser(resp: WireResponse, state: _StreamState, draining: set[asyncio.Task]):
    async def release() -> None:
        if resp.finished or not state.answered:
            # A finished stream gives its connection back; one the client left mid-call is
            # closed, which is how the upstream learns the client went away.
            resp.release()
            return
        # Answered, but the stream's end has not arrived yet: read it in the background
        # (bounded) so the connection can be reused, instead of paying a new one per call.
        task = asyncio.get_running_loop().create_task(_drain(resp))
        draining.add(task)
        task.add_done_callback(draining.discard)

    return release


async def _drain(resp: WireResponse) -> None:
    seen = 0
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for chunk in resp.chunks():
                seen += len(chunk)
                if seen > _DRAIN_BYTES:
                    break
    except (TimeoutError, WireError, OSError):
        pass
    finally:
        resp.release()
