"""FastMCP's proxy in front of an upstream URL, the comparison point for the sidecar (runs in bench/.venv).

    bench/.venv/bin/python bench/fastmcp_proxy.py --upstream URL --port P [--connected]

Without --connected it is `create_proxy(url)` as FastMCP documents it (a new
upstream session per call); with it the proxy shares one connected client.
"""

from __future__ import annotations

import argparse
import asyncio

from fastmcp import Client
from fastmcp.server import create_proxy


async def serve(upstream: str, port: int, connected: bool) -> None:
    options = dict(show_banner=False, transport="http", host="127.0.0.1", port=port, log_level="warning")
    if not connected:
        await create_proxy(upstream, name="fastmcp-proxy").run_http_async(**options)
        return
    async with Client(upstream) as client:
        await create_proxy(client, name="fastmcp-proxy").run_http_async(**options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connected", action="store_true")
    args = parser.parse_args()
    asyncio.run(serve(args.upstream, args.port, args.connected))


if __name__ == "__main__":
    main()
