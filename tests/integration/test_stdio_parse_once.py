"""A stdio tools/call through the whole sidecar (endpoint, chain, bridge, child) is parsed once each way."""

from __future__ import annotations

import uuid

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from helpers.stdio_servers import STDIO_TOOLS
from toolmesh.sidecar.front.app import create_app
from toolmesh.sidecar.settings import SidecarSettings
from toolmesh.sidecar.transports.stdio import StdioUpstream

pytestmark = pytest.mark.timeout(60)

HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


async def test_a_tools_call_is_parsed_once_on_the_way_in_and_once_on_the_way_out(monkeypatch):
    upstream = StdioUpstream(STDIO_TOOLS, start_timeout=20)
    server = TestServer(create_app(SidecarSettings(server_name="parse-once", transport="stdio"), upstream))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            url = str(server.make_url("/mcp"))
            opened = await http.post(url, headers=HEADERS, json={
                "jsonrpc": "2.0", "id": 0, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}})
            assert opened.status == 200
            headers = {**HEADERS, "Mcp-Session-Id": opened.headers["Mcp-Session-Id"],
                       "MCP-Protocol-Version": "2025-11-25"}

            marker = uuid.uuid4().hex
            parsed: list[bytes] = []
            real_loads = orjson.loads

            def counting_loads(data):
                raw = data.encode() if isinstance(data, str) else bytes(data)
                if marker.encode() in raw:
                    parsed.append(raw)
                return real_loads(data)

            monkeypatch.setattr(orjson, "loads", counting_loads)
            answer = await http.post(url, headers=headers, json={
                "jsonrpc": "2.0", "id": 7, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": marker}}})
            body = await answer.read()
            monkeypatch.setattr(orjson, "loads", real_loads)

        assert answer.status == 200
        message = real_loads(body)
        assert message["id"] == 7 and marker in message["result"]["content"][0]["text"]
        requests = [raw for raw in parsed if b'"method":"tools/call"' in raw.replace(b" ", b"")]
        answers = [raw for raw in parsed if b'"result"' in raw]
        assert len(requests) == 1, f"the request was parsed {len(requests)} times"
        assert len(answers) == 1, f"the answer was parsed {len(answers)} times"
    finally:
        await server.close()
