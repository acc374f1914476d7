"""An MCP server (official SDK) that announces changes outside any call: resource updates and list changes on the
session's GET stream, as servers do when something changes by itself. The gateway relay tests' backend.

Run as a script: `python notifying_server.py --port 8123`.
"""

from __future__ import annotations

import argparse

from mcp.server.mcpserver import Context, MCPServer

WATCHED = "test://watched"


def build() -> MCPServer:
    server = MCPServer(name="notifying")

    @server.resource(WATCHED, mime_type="text/plain")
    def watched() -> str:
        """A resource that changes."""
        return "current"

    @server.prompt()
    def greeting() -> str:
        """A prompt that comes and goes."""
        return "hello"

    @server.tool()
    async def change(ctx: Context) -> str:
        """Changes the watched resource and the prompt list, announced outside this call."""
        session = ctx.request_context.session
        await session.send_resource_updated(WATCHED)
        await session.send_prompt_list_changed()
        await session.send_resource_list_changed()
        return "changed"

    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    build().run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
