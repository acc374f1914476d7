"""What tools the upstream offers, asked over the `Upstream` protocol as any MCP client would ask it.

Used by the heartbeat (the tools it reports) and by tool traits (which tools are read-only); below both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import orjson

LIST_PAGES_MAX = 50
"""tools/list pages read at most: an upstream that pages forever is cut off there."""


async def list_tools(upstream: Any) -> list[dict[str, Any]]:
    """initialize → tools/list (every page) → end the session, over the `Upstream` protocol."""
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    init = await _rpc(upstream, headers, 1, "initialize", {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "toolmesh-heartbeat", "version": "1"}})
    session_id = init["headers"].get("Mcp-Session-Id") or init["headers"].get("mcp-session-id")
    headers = dict(headers)
    if session_id:
        headers["Mcp-Session-Id"] = session_id
    version = (init["message"].get("result") or {}).get("protocolVersion")
    if version:
        headers["MCP-Protocol-Version"] = version
    try:
        response = await upstream.post(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}), headers)
        await _drain(response)
        tools: list[dict[str, Any]] = []
        cursor = None
        for page in range(LIST_PAGES_MAX):
            params = {"cursor": cursor} if cursor else {}
            listed = await _rpc(upstream, headers, 2 + page, "tools/list", params)
            result = listed["message"].get("result") or {}
            tools.extend(t for t in result.get("tools") or [] if isinstance(t, dict))
            cursor = result.get("nextCursor")
            if not cursor:
                break
        return tools
    finally:
        if session_id:
            with contextlib.suppress(Exception):
                await _drain(await upstream.delete(headers))


async def _rpc(upstream: Any, headers: Mapping[str, str], request_id: int, method: str,
               params: Mapping[str, Any]) -> dict[str, Any]:
    body = orjson.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
    response = await upstream.post(body, headers)
    try:
        message = None
        if response.body is not None:
            message = orjson.loads(response.body)
        elif response.events is not None:
            async for event in response.events:
                candidate = orjson.loads(event.data) if event.data else None
                if isinstance(candidate, dict) and candidate.get("id") == request_id:
                    message = candidate
                    break
    finally:
        await response.release()
    if not isinstance(message, dict) or "error" in message or response.status >= 400:
        error = (message or {}).get("error") if isinstance(message, dict) else None
        raise RuntimeError(f"{method}: HTTP {response.status} {error or ''}".strip())
    return {"message": message, "headers": dict(response.headers)}


async def _drain(response: Any) -> None:
    try:
        if response.events is not None:
            async for _ in response.events:
                pass
    finally:
        await response.release()
