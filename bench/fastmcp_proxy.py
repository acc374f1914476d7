"""FastMCP's proxy in front of an upstream URL, the comparison point for the sidecar (runs in bench/.venv).

    bench/.venv/bin/python bench/fastmcp_proxy.py --upstream URL --port P [--connected] [--middleware]

Without --connected it is `create_proxy(url)` as FastMCP documents it (a new
upstream session per call); with it the proxy shares one connected client.
--middleware adds FastMCP's own response cache and retry middleware, the
counterpart of a toolmesh policy with cache and retry on.
"""

from __future__ import annotations

import argparse
import asyncio

from fastmcp import Client
from fastmcp.server import create_proxy
from fastmcp.server.middleware.caching import ResponseCachingMiddleware
from fastmcp.server.middleware.error_handling import RetryMiddleware


def with_middleware(proxy):
    """FastMCP's response cache (in memory, 300 s for tool calls) and its retry middleware (3 retries)."""
    proxy.add_middleware(RetryMiddleware(max_retries=3))
    proxy.add_middleware(ResponseCachingMiddleware(call_tool_settings={"ttl": 300}))
    return proxy


async def serve(upstream: str, port: int, connected: bool, middleware: bool) -> None:
    options = dict(show_banner=False, transport="http", host="127.0.0.1", port=port, log_level="warning")
    wrap = with_middleware if middleware else (lambda proxy: proxy)
    if not connected:
        await wrap(create_proxy(upstream, name="fastmcp-proxy")).run_http_async(**options)
        return
    async with Client(upstream) as client:
        await wrap(create_proxy(client, name="fastmcp-proxy")).run_http_async(**options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connected", action="store_true")
    parser.add_argument("--middleware", action="store_true")
    args = parser.parse_args()
    asyncio.run(serve(args.upstream, args.port, args.connected, args.middleware))


if __name__ == "__main__":
    main()
