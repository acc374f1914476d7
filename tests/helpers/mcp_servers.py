"""Reusable MCP test servers built with the official Python SDK, and launchers that run them on loopback.

Run as a script (`python tests/helpers/mcp_servers.py --port P [--stateless] [--json-response]`)
it serves Streamable HTTP at `/mcp` with tools that exercise what a proxy must carry:
progress, sampling and elicitation requests, logging, errors, slow calls and `_meta`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcp.server import MCPServer  # noqa: E402
from mcp.server.mcpserver import Context  # noqa: E402
from mcp.types import SamplingMessage, TextContent, ToolAnnotations  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from helpers import ROOT, VENV_BIN, free_port, listening  # noqa: E402


class Answer(BaseModel):
    """What the elicitation tool asks the user for."""

    colour: str


CALLS = {"slow_started": 0, "slow_cancelled": 0}
"""Per server process: what happened to `slow` calls (the cancellation tests read it back with `calls`)."""


def build_server(name: str = "fixture"):
    """An MCPServer with the tools the integration tests call."""
    mcp = MCPServer(name)

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True, idempotentHint=True))
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @mcp.tool()
    def fail(reason: str = "broken") -> str:
        """Always fails with a tool error."""
        raise ValueError(reason)

    @mcp.tool()
    async def slow(seconds: float) -> str:
        """Sleep, then answer; for timeouts and cancellation (a cancelled call is counted)."""
        CALLS["slow_started"] += 1
        try:
            await asyncio.sleep(seconds)
        except BaseException:
            CALLS["slow_cancelled"] += 1
            raise
        return f"slept {seconds}"

    @mcp.tool()
    def calls() -> dict[str, int]:
        """How many `slow` calls started and how many were cancelled before finishing."""
        return dict(CALLS)

    @mcp.tool()
    async def count(steps: int, ctx: Context, delay: float = 0.0) -> str:
        """Report progress once per step."""
        for i in range(1, steps + 1):
            await ctx.report_progress(i, steps, f"step {i}")
            if delay:
                await asyncio.sleep(delay)
        return f"counted {steps}"

    @mcp.tool()
    def show_meta(ctx: Context) -> dict[str, Any]:
        """Return the request's `_meta` as the server received it."""
        meta = ctx.request_context.meta
        if meta is None:
            return {}
        if hasattr(meta, "model_dump"):
            return meta.model_dump(by_alias=True, exclude_none=True)
        return dict(meta)

    @mcp.tool()
    def show_headers(ctx: Context) -> dict[str, str]:
        """Return the HTTP headers of the request as the server received them."""
        return {k.lower(): v for k, v in (ctx.headers or {}).items()}

    @mcp.tool()
    async def ask_sampling(prompt: str, ctx: Context) -> str:
        """Ask the client's model (sampling) and return its text."""
        result = await ctx.session.create_message(
            messages=[SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
            max_tokens=50,
        )
        content = result.content
        return getattr(content, "text", str(content))

    @mcp.tool()
    async def ask_elicitation(ctx: Context) -> str:
        """Ask the user (elicitation) for a colour."""
        result = await ctx.elicit("Favourite colour?", Answer)
        if result.action == "accept" and result.data is not None:
            return f"colour={result.data.colour}"
        return f"action={result.action}"

    @mcp.tool()
    async def change_tools(ctx: Context) -> str:
        """Add a tool and announce `notifications/tools/list_changed`."""
        if "added" not in {t.name for t in await mcp.list_tools()}:
            mcp.add_tool(lambda: "added", name="added", description="Added at run time.")
        await ctx.notify_tools_changed()  # subscribers (2026-07-28 subscriptions/listen)
        if ctx.request_context.session is not None:
            with contextlib.suppress(Exception):  # session-era clients get the notification itself
                await ctx.request_context.session.send_tool_list_changed()
        return "changed"

    return mcp


class MemoryEventStore:
    """An in-memory `EventStore` so the server supports resumption with Last-Event-ID."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str, Any]] = []
        self._ids = itertools.count(1)

    async def store_event(self, stream_id, message):
        event_id = str(next(self._ids))
        self._events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id, send_callback):
        from mcp.server.streamable_http import EventMessage

        stream_id = next((s for e, s, _ in self._events if e == last_event_id), None)
        if stream_id is None:
            return None
        after = False
        for event_id, sid, message in list(self._events):
            if event_id == last_event_id:
                after = True
                continue
            if after and sid == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


def serve(port: int, *, stateless: bool, json_response: bool, resumable: bool,
          keep_alive: float | None = None) -> None:
    from mcp.server.streamable_http import EventStore

    EventStore.register(MemoryEventStore)
    mcp = build_server()
    mcp.settings.log_level = "WARNING"
    if keep_alive is not None:
        # The SDK's run() keeps uvicorn's 5 s keep-alive; tests of idle connections need it shorter.
        import uvicorn

        app = mcp.streamable_http_app(stateless_http=stateless, json_response=json_response,
                                      event_store=MemoryEventStore() if resumable else None)
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=keep_alive)
        return
    mcp.run(
        "streamable-http",
        host="127.0.0.1",
        port=port,
        stateless_http=stateless,
        json_response=json_response,
        event_store=MemoryEventStore() if resumable else None,
    )


@contextmanager
def sdk_http_server(*, stateless: bool = False, json_response: bool = False, resumable: bool = False,
                    port: int | None = None, log_path: Path | None = None,
                    keep_alive: float | None = None) -> Iterator[str]:
    """Run the fixture server in a subprocess; yields its `/mcp` URL once it accepts connections.

    `keep_alive`: seconds uvicorn keeps an idle connection open (its default is 5).
    """
    port = port or free_port()
    cmd = [str(VENV_BIN / "python"), __file__, "--port", str(port)]
    if stateless:
        cmd.append("--stateless")
    if json_response:
        cmd.append("--json-response")
    if resumable:
        cmd.append("--resumable")
    if keep_alive is not None:
        cmd += ["--keep-alive", str(keep_alive)]
    with listening(cmd, port, what="SDK test server", log_path=log_path):
        yield f"http://127.0.0.1:{port}/mcp"


EVERYTHING = ROOT / "tests" / "node" / "node_modules" / ".bin" / "mcp-server-everything"
"""`@modelcontextprotocol/server-everything` from npm (tests/node, installed by `make node-deps`)."""


@contextmanager
def everything_http_server(*, port: int | None = None, log_path: Path | None = None) -> Iterator[str]:
    """Run the reference server-everything in its streamableHttp mode; yields its `/mcp` URL."""
    assert EVERYTHING.exists(), f"{EVERYTHING} is missing: run `make node-deps`"
    port = port or free_port()
    with listening([str(EVERYTHING), "streamableHttp"], port, what="server-everything", timeout=30,
                   env={"PORT": str(port)}, log_path=log_path):
        yield f"http://127.0.0.1:{port}/mcp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stateless", action="store_true")
    parser.add_argument("--json-response", action="store_true")
    parser.add_argument("--resumable", action="store_true")
    parser.add_argument("--keep-alive", type=float, default=None, help="uvicorn's keep-alive timeout in seconds")
    args = parser.parse_args()
    serve(args.port, stateless=args.stateless, json_response=args.json_response, resumable=args.resumable,
          keep_alive=args.keep_alive)


if __name__ == "__main__":
    main()
