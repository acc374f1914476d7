"""An SDK MCP server whose tools/list is paginated (two tools a page) and which offers resources and prompts, for authorization tests.

Run as a script (`python tests/helpers/guarded_server.py --port P`) it serves Streamable HTTP at `/mcp`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcp.server import MCPServer  # noqa: E402
from mcp.types import ListToolsResult  # noqa: E402

from helpers import VENV_BIN, free_port, listening  # noqa: E402

PAGE_SIZE = 2
TOOLS = ("db_query", "db_write", "docs_search", "public_time", "deploy")


class PagedServer(MCPServer):
    """An MCPServer that lists its tools `PAGE_SIZE` at a time, with an opaque numeric cursor."""

    async def _handle_list_tools(self, ctx, params) -> ListToolsResult:
        tools = await self.list_tools()
        start = int(params.cursor) if params is not None and params.cursor else 0
        end = start + PAGE_SIZE
        return ListToolsResult(tools=tools[start:end], next_cursor=str(end) if end < len(tools) else None)


def build_server() -> PagedServer:
    mcp = PagedServer("guarded")
    for name in TOOLS:
        mcp.add_tool(lambda name=name: f"{name} done", name=name, description=f"The {name} tool.")

    @mcp.resource("file:///docs/readme.md")
    def readme() -> str:
        """Public documentation."""
        return "read me"

    @mcp.resource("file:///secret/keys.txt")
    def keys() -> str:
        """Secret material."""
        return "the keys"

    @mcp.prompt()
    def greet(name: str = "you") -> str:
        """A greeting anyone may use."""
        return f"Hello {name}"

    @mcp.prompt()
    def admin_prompt() -> str:
        """Only for administrators."""
        return "You are root."

    return mcp


@contextmanager
def guarded_http_server(log_path: Path | None = None) -> Iterator[str]:
    """Run the server in a subprocess; yields its `/mcp` URL once it accepts connections."""
    port = free_port()
    with listening([str(VENV_BIN / "python"), __file__, "--port", str(port)], port, what="guarded test server",
                   log_path=log_path):
        yield f"http://127.0.0.1:{port}/mcp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    mcp = build_server()
    mcp.settings.log_level = "WARNING"
    mcp.run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
