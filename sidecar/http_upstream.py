"""The Streamable HTTP upstream: one pooled aiohttp client session to the MCP server the sidecar fronts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

import aiohttp
import orjson

from toolmesh.sidecar.chain import SseEvent
from toolmesh.sidecar.errors import UpstreamTimeout, UpstreamUnavailable
from toolmesh.sidecar.jsonrpc import iter_sse
from toolmesh.sidecar.upstream import UpstreamResponse

log = logging.getLogger("toolmesh.sidecar.upstream")

# Response headers that describe one hop, or that aiohttp already undid (compression, chunking).
_NOT_RELAYED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "content-length", "content-encoding", "date", "server",
})

PROBE_PROTOCOL_VERSION = "2025-11-25"


def relayed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream response headers a client should see."""
    return {k: v for k, v in headers.items() if k.lower() not in _NOT_RELAYED}


class HttpUpstream:
    """An MCP server reached over Streamable HTTP at `url`."""

    def __init__(self, url: str, *, timeout: float = 300.0, connect_timeout: float = 5.0, max_connections: int = 256):
        self.url = url
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=timeout)
        # The server stream (GET) may rightly stay silent for hours.
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=None)
        self._probe_timeout = aiohttp.ClientTimeout(total=min(timeout, 5.0), sock_connect=connect_timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, keepalive_timeout=30,
                                         enable_cleanup_closed=False, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            json_serialize=lambda o: orjson.dumps(o).decode(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        return await self._send("POST", headers, body, self._timeout)

    async def get(self, headers: Mapping[str, str]) -> UpstreamResponse:
        return await self._send("GET", headers, None, self._stream_timeout)

    async def delete(self, headers: Mapping[str, str]) -> UpstreamResponse:
        return await self._send("DELETE", headers, None, self._timeout)

    async def _send(self, method: str, headers: Mapping[str, str], body: bytes | None,
                    timeout: aiohttp.ClientTimeout) -> UpstreamResponse:
        session = self._session
        if session is None:
            raise UpstreamUnavailable("upstream is not connected")
        try:
            resp = await session.request(method, self.url, data=body, headers=headers, timeout=timeout,
                                         allow_redirects=False)
        except asyncio.TimeoutError:
            raise UpstreamTimeout("upstream did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(f"upstream unreachable: {exc.__class__.__name__}") from None
        out_headers = relayed_headers(resp.headers)
        content_type = resp.headers.get("Content-Type", "")
        if content_type.startswith("text/event-stream"):
            return UpstreamResponse(status=resp.status, headers=out_headers, events=_events(resp),
                                    release=_releaser(resp))
        try:
            data = await resp.read()
        except asyncio.TimeoutError:
            resp.close()
            raise UpstreamTimeout("upstream did not finish its answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            resp.close()
            raise UpstreamUnavailable(f"upstream broke the connection: {exc.__class__.__name__}") from None
        resp.release()
        return UpstreamResponse(status=resp.status, headers=out_headers, body=data)

    async def probe(self) -> bool:
        """Initialize a throw-away session (ended at once); any JSON-RPC answer proves the server speaks MCP."""
        session = self._session
        if session is None:
            return False
        body = orjson.dumps({
            "jsonrpc": "2.0", "id": "toolmesh-probe", "method": "initialize",
            "params": {"protocolVersion": PROBE_PROTOCOL_VERSION, "capabilities": {},
                       "clientInfo": {"name": "toolmesh-probe", "version": "1"}},
        })
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        try:
            async with session.post(self.url, data=body, headers=headers, timeout=self._probe_timeout) as resp:
                session_id = resp.headers.get("Mcp-Session-Id")
                answered = await _answers(resp, "toolmesh-probe")
            if session_id:
                end = {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": PROBE_PROTOCOL_VERSION}
                async with session.delete(self.url, headers=end, timeout=self._probe_timeout):
                    pass
            return answered
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return False


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


async def _events(resp: aiohttp.ClientResponse) -> AsyncIterator[SseEvent]:
    try:
        async for event in iter_sse(resp.content.iter_any()):
            yield event
    except asyncio.TimeoutError:
        raise UpstreamTimeout("upstream went silent for longer than the upstream timeout") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnavailable(f"upstream broke the stream: {exc.__class__.__name__}") from None
    except ValueError as exc:
        raise UpstreamUnavailable(f"upstream sent a broken stream: {exc}") from None


def _releaser(resp: aiohttp.ClientResponse):
    async def release() -> None:
        # A finished stream gives its connection back to the pool; an unfinished one is
        # closed, which is how the upstream learns the client went away.
        if resp.content.at_eof():
            resp.release()
        else:
            resp.close()

    return release
