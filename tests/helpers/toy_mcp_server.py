"""A small MCP server (official SDK, Streamable HTTP) whose tools say which server answered: the gateway tests' backend.

Run as a script: `python toy_mcp_server.py --name alpha --port 8123 [--tools echo,slow]`.
"""

from __future__ import annotations

import argparse
import asyncio

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError


def build(name: str, tools: list[str]) -> MCPServer:
    server = MCPServer(name)

    if "echo" in tools:
        @server.tool(description=f"Echo a message back, prefixed with {name}")
        def echo(message: str) -> str:
            return f"{name}:{message}"

    if "slow" in tools:
        @server.tool(description="Report progress `steps` times, then answer; waits on nothing but its own steps")
        async def slow(steps: int, ctx: Context) -> str:
            for i in range(steps):
                await ctx.report_progress(i + 1, steps, f"step {i + 1}")
                await asyncio.sleep(0.05)
            return f"{name}:done {steps}"

    if "hang" in tools:
        @server.tool(description="Report one progress step, then wait until cancelled")
        async def hang(ctx: Context) -> str:
            await ctx.report_progress(1, 2, "started")
            await asyncio.Event().wait()
            return "never"

    if "fail" in tools:
        @server.tool(description="Always fails")
        def fail(reason: str = "broken") -> str:
            raise RuntimeError(reason)

    if "task" in tools:
        running = {"now": 0, "peak": 0}
        groups: dict[str, list[asyncio.Future]] = {}

        @server.tool(description=f"Delegated work on {name}: echoes the task and its context")
        async def execute_task(task: str, context: dict | None = None, meet: str | None = None, count: int = 2,
                               fail: bool = False) -> dict:
            # `meet` makes `count` concurrent calls wait for each other: proof of parallelism without timing.
            running["now"] += 1
            running["peak"] = max(running["peak"], running["now"])
            try:
                if fail:
                    raise ToolError(f"task {task} failed on purpose")
                if meet:
                    waiting = groups.setdefault(meet, [])
                    if len(waiting) + 1 >= count:
                        for other in waiting:
                            other.set_result(None)
                        waiting.clear()
                    else:
                        arrived = asyncio.get_running_loop().create_future()
                        waiting.append(arrived)
                        await asyncio.wait_for(arrived, timeout=10)
                return {"agent": name, "task": task, "context": context, "peak": running["peak"]}
            finally:
                running["now"] -= 1

    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tools", default="echo")
    args = parser.parse_args()
    build(args.name, args.tools.split(",")).run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
