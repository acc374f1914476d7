"""Raw 2026-07-28 tools/call requests as a stateless client sends them: the `_meta` envelope and the Mcp-* headers."""

from __future__ import annotations

from typing import Any

import httpx2
import orjson

STATELESS_ERA = "2026-07-28"
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": STATELESS_ERA, "io.modelcontextprotocol/clientCapabilities": {}}


def tools_call(tool: str, arguments: dict[str, Any], request_id: int = 1) -> dict[str, Any]:
    """The JSON-RPC message of a stateless tools/call."""
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": ENVELOPE}}


def tools_call_headers(tool: str, token: str | None = None, **headers: str) -> dict[str, str]:
    """The HTTP headers of a stateless tools/call; `headers` are added last and may replace any."""
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": STATELESS_ERA, "Mcp-Method": "tools/call", "Mcp-Name": tool, **headers}


async def post_tools_call(url: str, tool: str, arguments: dict[str, Any], *, token: str | None = None,
                          request_id: int = 1, **headers: str) -> httpx2.Response:
    """POST one stateless tools/call to `url`; the response whatever its status."""
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(url, content=orjson.dumps(tools_call(tool, arguments, request_id)),
                               headers=tools_call_headers(tool, token, **headers))
