"""A minimal, fast Streamable HTTP MCP server for benchmarks: initialize, tools/list, tools/call echo, JSON answers only.

It does the least an MCP server can do so that the proxy in front of it, not
the upstream, is what a benchmark measures. It also swallows OTLP/HTTP exports
(`/v1/traces`, `/v1/metrics`) and counts the calls it served (`GET /stats`). Both eras: session-era clients get
an `Mcp-Session-Id`; 2026-07-28 clients may call without one.

    python bench/upstream.py --port 7500 [--tools 20]
    python bench/upstream.py --stdio [--tools 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

import orjson
from aiohttp import web

PROTOCOL_VERSIONS = ("2026-07-28", "2025-11-25", "2025-06-18", "2025-03-26")
JSON_HEADERS = {"Content-Type": "application/json"}

ECHO_TOOL = {
    "name": "echo",
    "description": "Returns its text argument unchanged.",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    # Read-only and idempotent, so a caching policy may serve it from cache.
    "annotations": {"readOnlyHint": True, "idempotentHint": True, "destructiveHint": False},
}


def tool_list(extra: int) -> list[dict]:
    """The echo tool plus `extra` filler tools, so catalogue-size benchmarks have something to list."""
    fillers = [{"name": f"tool_{i:03d}", "description": f"Filler tool number {i}.",
                "inputSchema": {"type": "object", "properties": {"value": {"type": "integer"}}}}
               for i in range(extra)]
    return [ECHO_TOOL, *fillers]


def make_responder(extra_tools: int, sessions: set[str], served: dict[str, int]):
    """The JSON-RPC side, shared by the HTTP and stdio transports: message (+ response headers) -> reply or None."""
    tools_result = {"tools": tool_list(extra_tools)}

    def answer(message: dict, headers: dict[str, str]) -> dict | None:
        method = message.get("method")
        if "id" not in message:
            return None  # a notification or a response: nothing to say
        msg_id = message["id"]
        params = message.get("params") or {}
        if method == "tools/call":
            served["tools/call"] += 1
            arguments = params.get("arguments") or {}
            if params.get("name") != "echo":
                return {"jsonrpc": "2.0", "id": msg_id,
                        "result": {"content": [{"type": "text", "text": f"tool {params.get('name')} ok"}]}}
            return {"jsonrpc": "2.0", "id": msg_id,
                    "result": {"content": [{"type": "text", "text": str(arguments.get("text", ""))}], "isError": False}}
        if method == "tools/list":
            return {"jsonrpc": "2.0", "id": msg_id, "result": tools_result}
        if method == "initialize":
            asked = params.get("protocolVersion")
            version = asked if asked in PROTOCOL_VERSIONS[1:] else PROTOCOL_VERSIONS[1]
            session = uuid.uuid4().hex
            sessions.add(session)
            headers["Mcp-Session-Id"] = session
            return {"jsonrpc": "2.0", "id": msg_id, "result": {
                "protocolVersion": version, "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "bench-upstream", "version": "1.0.0"}}}
        if method == "server/discover":
            return {"jsonrpc": "2.0", "id": msg_id, "result": {
                "supportedVersions": list(PROTOCOL_VERSIONS), "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "bench-upstream", "version": "1.0.0"}}}
        if method == "ping":
            return {"jsonrpc": "2.0", "id": msg_id, "result": {}}
        return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32601, "message": f"Method not found: {method}"}}

    return answer


def make_app(extra_tools: int = 0) -> web.Application:
    sessions: set[str] = set()
    served = {"tools/call": 0, "otlp": 0}  # read by the harness: how many calls a proxy actually passed on
    answer = make_responder(extra_tools, sessions, served)

    async def post(request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.Response(status=400, headers=JSON_HEADERS, body=orjson.dumps(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}))
        session = request.headers.get("Mcp-Session-Id")
        if session is not None and session not in sessions:
            return web.Response(status=404, headers=JSON_HEADERS, body=orjson.dumps(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": "Session not found"}}))
        headers = dict(JSON_HEADERS)
        if isinstance(body, list):
            replies = [r for r in (answer(m, headers) for m in body if isinstance(m, dict)) if r is not None]
            if not replies:
                return web.Response(status=202)
            return web.Response(headers=headers, body=orjson.dumps(replies))
        reply = answer(body, headers) if isinstance(body, dict) else None
        if reply is None:
            return web.Response(status=202)
        return web.Response(headers=headers, body=orjson.dumps(reply))

    async def delete(request: web.Request) -> web.Response:
        sessions.discard(request.headers.get("Mcp-Session-Id", ""))
        return web.Response(status=200)

    async def stats(request: web.Request) -> web.Response:
        return web.Response(headers=JSON_HEADERS, body=orjson.dumps(served))

    async def otlp_sink(request: web.Request) -> web.Response:
        # An OTLP/HTTP collector that keeps nothing, so traced proxies can export somewhere cheap.
        await request.read()
        served["otlp"] += 1
        return web.Response(content_type="application/x-protobuf", body=b"")

    async def no_stream(request: web.Request) -> web.Response:
        return web.Response(status=405, headers={"Allow": "POST, DELETE"})

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/mcp", post)
    app.router.add_delete("/mcp", delete)
    app.router.add_get("/mcp", no_stream)
    app.router.add_get("/stats", stats)
    app.router.add_post("/v1/traces", otlp_sink)
    app.router.add_post("/v1/metrics", otlp_sink)
    return app


def serve_stdio(extra_tools: int) -> None:
    """Newline-delimited JSON-RPC on stdin/stdout, for proxies that bridge stdio servers."""
    answer = make_responder(extra_tools, set(), {"tools/call": 0, "otlp": 0})
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        messages = message if isinstance(message, list) else [message]
        replies = [r for r in (answer(m, {}) for m in messages if isinstance(m, dict)) if r is not None]
        if replies:
            out.write(orjson.dumps(replies if isinstance(message, list) else replies[0]) + b"\n")
            out.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7500)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tools", type=int, default=0, help="filler tools listed besides echo")
    parser.add_argument("--stdio", action="store_true", help="serve over stdin/stdout instead of HTTP")
    args = parser.parse_args()
    if args.stdio:
        serve_stdio(args.tools)
        return
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(make_app(args.tools), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
