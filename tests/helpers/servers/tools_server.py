"""An MCP server (official SDK) with the tools the transport tests need, over stdio or, given `sse PORT`, legacy SSE."""

from __future__ import annotations

import os
import sys

import anyio
import mcp_types as types
from mcp.server import stdio as sdk_stdio
from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel

server = MCPServer("stdio-tools")


@server.tool()
async def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
async def add(a: int, b: int) -> int:
    """The sum of two integers of any size (Python's are exact)."""
    return a + b


@server.tool()
async def environment(name: str) -> str:
    """The value of an environment variable of the server's process ("" when unset)."""
    return os.environ.get(name, "")


@server.tool()
async def whoami() -> str:
    """The server's process id, to tell one child from the next."""
    return str(os.getpid())


@server.tool()
async def request_header(name: str, ctx: Context) -> str:
    """The value of HTTP header `name` on the message that carried this call (empty over stdio)."""
    return (ctx.headers or {}).get(name.lower(), "")


@server.tool()
async def count(steps: int, ctx: Context) -> str:
    """Report `steps` progress notifications, then answer."""
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, f"step {step}")
    return f"counted {steps}"


@server.tool()
async def trickle(steps: int, interval: float, ctx: Context) -> str:
    """Report progress every `interval` seconds, `steps` times, then answer."""
    for step in range(1, steps + 1):
        await anyio.sleep(interval)
        await ctx.report_progress(step, steps)
    return f"trickled {steps}"


@server.tool()
async def ask_model(question: str, ctx: Context) -> str:
    """Ask the client's model (sampling) and return its answer."""
    result = await ctx.session.create_message(
        messages=[types.SamplingMessage(role="user", content=types.TextContent(type="text", text=question))],
        max_tokens=50,
    )
    content = result.content
    return content.text if isinstance(content, types.TextContent) else repr(content)


class Colour(BaseModel):
    colour: str


@server.tool()
async def ask_user(ctx: Context) -> str:
    """Ask the user (elicitation) for a colour."""
    answer = await ctx.elicit("Which colour?", Colour)
    return f"{answer.action}:{answer.data.colour if answer.action == 'accept' else ''}"


@server.tool()
async def chatty(text: str, ctx: Context) -> str:
    """Log `text` to the client, then answer."""
    await ctx.info(text)
    return "logged"


@server.tool()
async def crash(code: int = 3) -> str:
    """Exit the process abruptly with `code`, after a last word on stderr."""
    print(f"about to crash with code {code}", file=sys.stderr, flush=True)
    os._exit(code)


@server.tool()
async def wait_forever(label: str) -> str:
    """Never answer; report on stderr when cancelled."""
    try:
        await anyio.sleep_forever()
    finally:
        print(f"cancelled {label}", file=sys.stderr, flush=True)
    return "unreachable"


@server.tool()
async def slow(seconds: float) -> str:
    """Answer after `seconds`."""
    await anyio.sleep(seconds)
    return f"slept {seconds}"


@server.tool()
async def garbage(oversized_bytes: int) -> str:
    """Write a line that is not JSON and an oversized line to the wire before answering."""
    claim = sdk_stdio._claims.get(1)
    fd = claim.private_fd if claim is not None and claim.private_fd is not None else 1
    os.write(fd, b"this is not json\n[1, 2\n" + b"x" * oversized_bytes + b"\n\n")
    return "still here"


@server.tool()
async def grow(name: str, ctx: Context) -> str:
    """Add a tool called `name` and tell every client the list changed."""
    server.add_tool(lambda: name, name=name, description="added at run time")
    await ctx.session.send_tool_list_changed()
    return f"added {name}"


@server.tool()
async def shout(text: str) -> str:
    """Write `text` on stderr and answer."""
    print(text, file=sys.stderr, flush=True)
    return "shouted"


_GATES: dict[str, anyio.Event] = {}
_CANCELLED: dict[str, anyio.Event] = {}


def _event(events: dict[str, anyio.Event], name: str) -> anyio.Event:
    return events.setdefault(name, anyio.Event())


@server.tool()
async def gated(name: str, before: int, after: int, ctx: Context, size: int = 0) -> str:
    """Report `before` progress steps, wait until `open_gate(name)`, report `after` more, then answer.

    Each step's message is `size` bytes long; a cancellation is told to `wait_cancelled(name)`.
    """
    total = before + after
    try:
        for step in range(1, before + 1):
            await ctx.report_progress(step, total, "x" * size)
        await _event(_GATES, name).wait()
        for step in range(before + 1, total + 1):
            await ctx.report_progress(step, total, "x" * size)
    except anyio.get_cancelled_exc_class():
        _event(_CANCELLED, name).set()
        raise
    return f"gated {name} done"


@server.tool()
async def open_gate(name: str) -> str:
    """Let `gated(name)` go on."""
    _event(_GATES, name).set()
    return f"opened {name}"


@server.tool()
async def wait_cancelled(name: str) -> str:
    """Answer once a `gated(name)` call has been cancelled."""
    await _event(_CANCELLED, name).wait()
    return f"{name} was cancelled"


if __name__ == "__main__":
    print("stdio-tools starting", file=sys.stderr, flush=True)
    if sys.argv[1:2] == ["sse"]:
        server.run("sse", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
