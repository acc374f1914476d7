"""What idle gateway sessions cost the registry, and how fast a flood of `initialize` from one caller is turned away.

    .venv/bin/python bench/gateway_sessions.py [--sessions 5000] [--flood-seconds 3] [--pythonpath DIR]

Prints JSON:
- "idle_sessions": RSS of `toolmesh registry` before and after N anonymous `initialize` (per-caller cap raised to
  N so all are kept), the growth per session, and the rate they were opened at.
- "flood": one anonymous caller sending `initialize` on 8 connections for a few seconds at a registry with the
  default caps: how many were answered 200 and 429, and at what rate.
`--pythonpath DIR` runs another tree of the code (a directory holding a `toolmesh` package), to compare
(`--no-cap-flags` for one from before the caps).
Not a test: nothing is asserted. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson

BIN = Path(sys.executable).parent
INIT = orjson.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                     "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                "clientInfo": {"name": "bench", "version": "1"}}})
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_registry(port: int, extra: list[str], pythonpath: str | None) -> subprocess.Popen:
    env = dict(os.environ, TOOLMESH_REGISTRY_SECRET=secrets.token_hex(16))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [str(BIN / "python"), "-m", "toolmesh", "registry", "--listen", f"127.0.0.1:{port}", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


async def wait_up(http: aiohttp.ClientSession, base: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"registry exited with {proc.returncode}")
        try:
            async with http.get(f"{base}/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("registry did not come up")


async def initialize(http: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    async with http.post(url, data=INIT, headers=HEADERS) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Mcp-Session-Id")


async def idle_sessions(count: int, pythonpath: str | None, caps: bool = True) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = ["--max-sessions-per-caller", str(count), "--max-sessions", str(count)] if caps else []
    proc = start_registry(port, extra, pythonpath)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as http:
            await wait_up(http, base, proc)
            # Warm up code paths and allocator pools with sessions opened and ended again.
            for _ in range(200):
                _, session = await initialize(http, f"{base}/mcp")
                async with http.delete(f"{base}/mcp", headers={"Mcp-Session-Id": session or ""}) as resp:
                    await resp.read()
            before = rss_kb(proc.pid)
            started = time.perf_counter()
            statuses = await asyncio.gather(*(initialize(http, f"{base}/mcp") for _ in range(count)))
            seconds = time.perf_counter() - started
            after = rss_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    kept = sum(1 for status, _ in statuses if status == 200)
    return {"sessions": count, "kept": kept, "rss_before_kb": before, "rss_after_kb": after,
            "rss_growth_kb": after - before, "bytes_per_session": round((after - before) * 1024 / max(kept, 1)),
            "initializes_per_s": round(count / seconds)}


async def flood(seconds: float, pythonpath: str | None) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_registry(port, [], pythonpath)
    counts: collections.Counter[int] = collections.Counter()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as http:
            await wait_up(http, base, proc)
            rss_before = rss_kb(proc.pid)
            deadline = time.perf_counter() + seconds

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    status, _ = await initialize(http, f"{base}/mcp")
                    counts[status] += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(8)))
            elapsed = time.perf_counter() - started
            rss_after = rss_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    total = sum(counts.values())
    return {"seconds": round(elapsed, 2), "answers": {str(k): v for k, v in sorted(counts.items())},
            "answers_per_s": round(total / elapsed), "refused_per_s": round(counts[429] / elapsed),
            "rss_growth_kb": rss_after - rss_before}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--flood-seconds", type=float, default=3.0)
    parser.add_argument("--pythonpath", help="a directory holding another tree's `toolmesh` package")
    parser.add_argument("--no-cap-flags", action="store_true", help="for a tree whose registry has no session caps")
    args = parser.parse_args()
    result = {"idle_sessions": asyncio.run(idle_sessions(args.sessions, args.pythonpath, not args.no_cap_flags))}
    if args.flood_seconds > 0:
        result["flood"] = asyncio.run(flood(args.flood_seconds, args.pythonpath))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
