"""An SDK MCP server whose tools return typed results (pydantic models, so `structuredContent` and an `outputSchema`).

Run as a script (`python tests/helpers/typed_server.py --port P`) it serves Streamable HTTP at `/mcp`.
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
from pydantic import BaseModel  # noqa: E402

from helpers import VENV_BIN, free_port, listening  # noqa: E402


class Row(BaseModel):
    """One row of a table."""

    id: int
    name: str
    note: str


class Table(BaseModel):
    """Rows, as a database tool returns them."""

    rows: list[Row]
    total: int


def build_server():
    mcp = MCPServer("typed")

    @mcp.tool()
    def table(rows: int) -> Table:
        """`rows` rows of a made-up table."""
        return Table(rows=[Row(id=i, name=f"row-{i}", note=f"note number {i} of the table") for i in range(rows)],
                     total=rows)

    @mcp.tool()
    def words(count: int) -> str:
        """`count` distinct words."""
        return " ".join(f"w{i}" for i in range(count))

    return mcp


@contextmanager
def typed_http_server(*, log_path: Path | None = None) -> Iterator[str]:
    """Run the typed server in a subprocess; yields its `/mcp` URL once it accepts connections."""
    port = free_port()
    with listening([str(VENV_BIN / "python"), __file__, "--port", str(port)], port, what="typed server",
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
