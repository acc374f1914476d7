"""A fault-injection upstream: an SDK MCP server behind a loopback relay that counts tool calls and breaks them on demand.

Run as a script (`python tests/helpers/fault_upstream.py --port P`) it serves the
SDK server with the tools the policy tests call. `fault_upstream()` starts that
server and, in a thread of the test process, a relay in front of it; the test
tells the relay what to do to the next calls of a tool — answer 503 (with or
without Retry-After), drop the connection, send a garbage body, stall, or add
`ttlMs`/`cacheScope` hints to the result — and reads how many calls of each
tool actually reached it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402
from aiohttp import ClientSession, ClientTimeout, web  # noqa: E402
from mcp.server import MCPServer  # noqa: E402
from mcp.server.mcpserver import Context  # noqa: E402
from mcp.types import ToolAnnotations  # noqa: E402
from pydantic import BaseModel  # noqa: E402


class Colour(BaseModel):
    """What the `ask` tool asks the user for."""

    colour: str

from helpers import VENV_BIN, free_port, listening  # noqa: E402

def build_server():
    """The SDK server behind the relay: tools with the annotations the cache, budget and retry rules look at."""
    mcp = MCPServer("faulty")

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def lookup(q: str) -> str:
        """Look something up (read-only)."""
        return f"result for {q}"

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def whoami(ctx: Context, q: str = "") -> str:
        """The subject the sidecar says is calling (read-only)."""
        headers = {k.lower(): v for k, v in (ctx.headers or {}).items()}
        return f"subject={headers.get('x-toolmesh-subject', '?')} q={q}"

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True, destructiveHint=True))
    def purge(q: str) -> str:
        """Claims read-only yet destructive: never cacheable."""
        return f"purged {q}"

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True))
    def delete_item(item: str) -> str:
        """Delete something (destructive)."""
        return f"deleted {item}"

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def broken(q: str) -> str:
        """Always a tool error (read-only)."""
        raise ValueError(f"cannot look up {q}")

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def words(count: int, prefix: str = "w") -> str:
        """`count` distinct words (read-only), for budgets."""
        return " ".join(f"{prefix}{i}" for i in range(count))

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True, idempotentHint=True))
    def flaky(q: str) -> str:
        """Answers normally; the relay breaks it on demand (read-only, idempotent)."""
        return f"flaky ok {q}"

    @mcp.tool()
    def send(q: str) -> str:
        """Not idempotent, not read-only: never retried."""
        return f"sent {q}"

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True))
    async def work(steps: int, delay: float, ctx: Context) -> str:
        """Report progress every `delay` seconds for `steps` steps, then answer."""
        for i in range(1, steps + 1):
            await asyncio.sleep(delay)
            await ctx.report_progress(i, steps, f"step {i}")
        return f"worked {steps}"

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True))
    async def stall(seconds: float) -> str:
        """Say nothing for `seconds`, then answer."""
        await asyncio.sleep(seconds)
        return f"stalled {seconds}"

    @mcp.tool()
    async def ask(ctx: Context) -> str:
        """Ask the user (elicitation) and answer with what they said."""
        result = await ctx.elicit("Favourite colour?", Colour)
        return f"colour={result.data.colour}" if result.action == "accept" and result.data else f"action={result.action}"

    return mcp


@dataclass
class Fault:
    """What the relay does to one tools/call instead of (or on top of) passing it on."""

    kind: str
    """"status", "drop", "garbage", "slow" or "hint"."""
    status: int = 503
    retry_after: str | None = None
    seconds: float = 0.0
    hints: dict[str, Any] | None = None


class FaultRelay:
    """The relay in front of the SDK server. Thread-safe controls; the aiohttp app runs on its own loop."""

    def __init__(self, target: str):
        self.target = target
        self.port = free_port()
        self.calls: Counter[str] = Counter()
        """tools/call requests that reached the relay, by tool name."""
        self.cancelled: list[Any] = []
        """`requestId`s of notifications/cancelled the relay saw."""
        self._faults: dict[str, deque[Fault]] = {}
        self._sticky: dict[str, Fault] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fault-relay", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    # -- controls (any thread) -----------------------------------------------------------

    def inject(self, tool: str, *faults: Fault, sticky: bool = False) -> None:
        """Apply `faults` to the next calls of `tool`, one each; `sticky` keeps applying the single fault given."""
        with self._lock:
            if sticky:
                self._sticky[tool] = faults[0]
            else:
                self._faults.setdefault(tool, deque()).extend(faults)

    def heal(self, tool: str | None = None) -> None:
        """Stop breaking `tool` (or every tool)."""
        with self._lock:
            for table in (self._faults, self._sticky):
                if tool is None:
                    table.clear()
                else:
                    table.pop(tool, None)

    def count(self, tool: str) -> int:
        with self._lock:
            return self.calls[tool]

    def _next_fault(self, tool: str) -> Fault | None:
        with self._lock:
            self.calls[tool] += 1
            queue = self._faults.get(tool)
            if queue:
                return queue.popleft()
            return self._sticky.get(tool)

    # -- the relay --------------------------------------------------------------------------

    def __enter__(self) -> FaultRelay:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fault relay did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with ClientSession(timeout=ClientTimeout(total=None, sock_connect=5)) as http:
            self._http = http
            app = web.Application()
            app.router.add_route("*", "/mcp", self._relay)
            runner = web.AppRunner(app, handle_signals=False)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._started.set()
            await self._stop.wait()
            await runner.cleanup()

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault: Fault | None = None
        if request.method == "POST" and body:
            try:
                message = orjson.loads(body)
            except orjson.JSONDecodeError:
                message = None
            if isinstance(message, dict):
                if message.get("method") == "tools/call":
                    fault = self._next_fault(str((message.get("params") or {}).get("name")))
                elif message.get("method") == "notifications/cancelled":
                    self.cancelled.append((message.get("params") or {}).get("requestId"))
        if fault is not None:
            if fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
                return web.Response(status=fault.status, text="upstream overloaded", headers=headers)
            if fault.kind == "drop":
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=500)
            if fault.kind == "garbage":
                return web.Response(status=200, body=b"\x00\xffthis is not JSON-RPC{", content_type="application/json")
            if fault.kind == "slow":
                await asyncio.sleep(fault.seconds)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")}
        async with self._http.request(request.method, self.target, data=body or None, headers=headers) as upstream:
            out = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    out.headers[name] = value
            if fault is not None and fault.kind == "hint":
                data = await upstream.read()
                hints = orjson.dumps(fault.hints or {})[1:-1]
                data = data.replace(b'"result":{', b'"result":{' + hints + b",", 1)
                out.content_length = len(data)
                await out.prepare(request)
                await out.write(data)
                return out
            await out.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
            except ConnectionResetError:
                pass  # the sidecar gave up on this call (a timeout): so does the relay
            return out


@contextmanager
def fault_upstream(log_dir: Path) -> Iterator[FaultRelay]:
    """Run the SDK server in a subprocess and the relay in a thread; yields the relay (its `url` is the upstream)."""
    port = free_port()
    cmd = [str(VENV_BIN / "python"), __file__, "--port", str(port)]
    with listening(cmd, port, what="faulty SDK server", log_path=log_dir / "faulty-server.log"):
        with FaultRelay(f"http://127.0.0.1:{port}/mcp") as relay:
            yield relay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    mcp = build_server()
    mcp.settings.log_level = "WARNING"
    mcp.run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
