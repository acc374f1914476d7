"""Stdio MCP servers for the bridge tests, and a JSON-RPC client that drives any `Upstream` through its interface."""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from helpers import ROOT, VENV_BIN

SERVERS = Path(__file__).resolve().parent / "servers"
STDIO_TOOLS = [sys.executable, str(SERVERS / "tools_server.py")]
"""Official-SDK stdio server: echo, whoami, count (progress), ask_model (sampling), crash, wait_forever, slow,
garbage, grow (list_changed), shout (stderr), gated/open_gate/wait_cancelled (a call held mid-way)."""


def sse_tools_server(port: int) -> list[str]:
    """The same tools served with the SDK's legacy HTTP+SSE transport at http://127.0.0.1:PORT/sse."""
    return [*STDIO_TOOLS, "sse", str(port)]
TIME_SERVER = [str(VENV_BIN / "mcp-server-time")]
"""The `mcp-server-time` reference server from PyPI."""
EVERYTHING_SERVER = [str(ROOT / "tests" / "node" / "node_modules" / ".bin" / "mcp-server-everything"), "stdio"]
"""`@modelcontextprotocol/server-everything` from npm (tests/node), in stdio mode."""

SAMPLING = {"sampling": {}}

ServerRequestHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class UpstreamClient:
    """One MCP client session spoken straight to an `Upstream` (post/get/delete), as the HTTP layer would relay it."""

    def __init__(self, upstream: Any, *, capabilities: Mapping[str, Any] | None = None,
                 on_server_request: ServerRequestHandler | None = None):
        self.upstream = upstream
        self.capabilities = dict(capabilities or {})
        self.on_server_request = on_server_request
        self.session_id: str | None = None
        self.protocol_version: str | None = None
        self.initialize_result: dict[str, Any] = {}
        self._ids = itertools.count(1)

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
        return headers

    async def initialize(self, protocol_version: str = "2025-11-25") -> dict[str, Any]:
        response = await self.upstream.post(orjson.dumps({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": protocol_version, "capabilities": self.capabilities,
                       "clientInfo": {"name": "bridge-test", "version": "1"}},
        }), self.headers)
        assert response.status == 200, response
        self.session_id = next(v for k, v in response.headers.items() if k.lower() == "mcp-session-id")
        message = orjson.loads(response.body)
        self.initialize_result = message["result"]
        self.protocol_version = message["result"]["protocolVersion"]
        done = await self.upstream.post(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
                                        self.headers)
        assert done.status == 202
        return message

    async def request(self, method: str, params: Mapping[str, Any] | None = None, *, request_id: Any = None,
                      events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Send a request; return its final response message. Notifications seen on the way go to `events`."""
        if request_id is None:
            request_id = next(self._ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        response = await self.upstream.post(orjson.dumps(message), self.headers)
        if response.body is not None:
            return orjson.loads(response.body)
        if response.status == 202:
            return {}  # accepted without an answer: the request was withdrawn
        assert response.events is not None, response
        try:
            async for event in response.events:
                if not event.data:
                    continue  # a priming event: an id to resume after, nothing to read
                incoming = orjson.loads(event.data)
                if "method" in incoming and "id" in incoming:
                    await self._answer(incoming)
                elif "method" in incoming:
                    if events is not None:
                        events.append(incoming)
                elif incoming.get("id") == request_id:
                    return incoming
        finally:
            await response.release()
        raise AssertionError(f"the stream for {method} ended without a response")

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None, **options: Any) -> dict[str, Any]:
        return await self.request("tools/call", {"name": name, "arguments": dict(arguments or {})}, **options)

    async def notify(self, method: str, params: Mapping[str, Any] | None = None) -> int:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        response = await self.upstream.post(orjson.dumps(message), self.headers)
        return response.status

    async def _answer(self, request: dict[str, Any]) -> None:
        if self.on_server_request is None:
            reply = {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": "not supported"}}
        else:
            reply = {"jsonrpc": "2.0", "id": request["id"], "result": await self.on_server_request(request)}
        response = await self.upstream.post(orjson.dumps(reply), self.headers)
        assert response.status == 202, response


async def collect_stream(response: Any, into: list[dict[str, Any]], stop: asyncio.Event) -> None:
    """Read a GET stream's events into `into` until `stop` is set or the stream ends."""
    assert response.events is not None
    iterator = response.events.__aiter__()
    try:
        while not stop.is_set():
            waiter = asyncio.ensure_future(iterator.__anext__())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if waiter not in done:
                waiter.cancel()
                break
            try:
                event = waiter.result()
            except StopAsyncIteration:
                break
            if event.data:  # (a priming event carries only an id)
                into.append(orjson.loads(event.data))
    finally:
        await response.release()


def text_of(response: Mapping[str, Any]) -> str:
    """The text of a tools/call result's first content block."""
    return response["result"]["content"][0]["text"]
