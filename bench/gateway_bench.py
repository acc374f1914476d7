"""The gateway benchmark: tools/call through gateway + sidecar against the sidecar alone and direct, tools/list over
100 servers x 20 tools, and what a workflow adds per task. Not a test: run it on a quiet machine.

    .venv/bin/python bench/gateway_bench.py [--calls 1000] [--out bench/results/gateway.json]

Processes: bench/upstream.py (a minimal aiohttp MCP server), `toolmesh sidecar` in front of it, `toolmesh registry`.
Latency is measured at concurrency 1 by an aiohttp client speaking the session era. Results are merged into the
output file under "tools_call", "tools_list", "workflow" and "expiry" (how soon a killed sidecar's tools leave
with the default 5 s heartbeat; `--only expiry` measures just that), keeping what other runs wrote there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BIN = Path(sys.executable).parent
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def wait_for(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


class Session:
    """A session-era MCP session over one keep-alive connection."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url, self.headers, self.ids = http, url, dict(ACCEPT), 0

    async def open(self) -> Session:
        init = await self.rpc("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                             "clientInfo": {"name": "bench", "version": "1"}}, keep_headers=True)
        assert "result" in init, init
        await self.http.post(self.url, data=orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
                             headers=self.headers)
        return self

    async def rpc(self, method: str, params: dict, keep_headers: bool = False, parse: bool = True) -> dict:
        self.ids += 1
        body = orjson.dumps({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params})
        async with self.http.post(self.url, data=body, headers=self.headers) as resp:
            if keep_headers and "Mcp-Session-Id" in resp.headers:
                self.headers["Mcp-Session-Id"] = resp.headers["Mcp-Session-Id"]
                self.headers["MCP-Protocol-Version"] = "2025-11-25"
            raw = await resp.read()
        if not parse:
            # Listing benchmarks time the gateway, not this client's JSON decoding of 2,000 tools.
            return {"result": {"bytes": len(raw)}} if resp.status == 200 and raw.endswith(b"}}") else {"error": raw}
        if resp.content_type == "text/event-stream":
            raw = [line[6:] for line in raw.splitlines() if line.startswith(b"data: ")][-1]
        return orjson.loads(raw)


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 3), "n": len(ordered)}


async def latency(session: Session, method: str, params: dict, calls: int, warmup: int, parse: bool = True) -> dict:
    for _ in range(warmup):
        await session.rpc(method, params, parse=parse)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        answer = await session.rpc(method, params, parse=parse)
        samples.append(time.perf_counter() - t0)
        assert "result" in answer and not answer["result"].get("isError"), answer
    return summary(samples)


async def measure(args: argparse.Namespace, logs: Path) -> dict:
    up_port, sc_port, reg_port = free_port(), free_port(), free_port()
    registry = f"http://127.0.0.1:{reg_port}"
    procs = [
        start([sys.executable, str(BENCH / "upstream.py"), "--port", str(up_port)], logs / "upstream.log"),
        start([str(BIN / "toolmesh"), "registry", "--listen", f"127.0.0.1:{reg_port}", "--heartbeat-interval", "1",
               "--page-size", "5000", "--insecure"], logs / "registry.log"),
        start([str(BIN / "toolmesh"), "sidecar", "--upstream", f"http://127.0.0.1:{up_port}/mcp", "--listen",
               f"127.0.0.1:{sc_port}", "--server-name", "bench", "--registry", registry], logs / "sidecar.log"),
    ]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            async def listed() -> bool:
                async with http.get(f"{registry}/v1/tools") as resp:
                    return any(t["name"] == "bench__echo" for t in (await resp.json())["tools"])

            await wait_for(listed, "the sidecar's heartbeat")
            echo = {"name": "echo", "arguments": {"text": "hello"}}
            direct = await Session(http, f"http://127.0.0.1:{up_port}/mcp").open()
            side = await Session(http, f"http://127.0.0.1:{sc_port}/mcp").open()
            gate = await Session(http, f"{registry}/mcp").open()
            results: dict = {}
            results["direct"] = await latency(direct, "tools/call", echo, args.calls, args.warmup)
            results["sidecar"] = await latency(side, "tools/call", echo, args.calls, args.warmup)
            results["gateway_sidecar"] = await latency(gate, "tools/call", {**echo, "name": "bench__echo"},
                                                       args.calls, args.warmup)
            for key in ("sidecar", "gateway_sidecar"):
                results[key]["added_p50_ms"] = round(results[key]["p50_ms"] - results["direct"]["p50_ms"], 3)
                results[key]["added_p99_ms"] = round(results[key]["p99_ms"] - results["direct"]["p99_ms"], 3)
            results["gateway_alone_added_p50_ms"] = round(
                results["gateway_sidecar"]["p50_ms"] - results["sidecar"]["p50_ms"], 3)

            # Workflows: a chain (each task waits for the one before) against the same calls made one by one.
            tasks = [{"id": f"t{i}", "server": "bench", "tool": "echo", "arguments": {"text": "hello"},
                      "dependsOn": [f"t{i - 1}"] if i else []} for i in range(args.chain)]
            chain_times, scheduling = [], []
            for _ in range(args.workflow_runs):
                t0 = time.perf_counter()
                async with http.post(f"{registry}/v1/workflows?wait=true", json={"tasks": tasks}) as resp:
                    run = await resp.json()
                chain_times.append(time.perf_counter() - t0)
                assert run["state"] == "succeeded", run
                scheduling.append(run["schedulingMsPerTask"])
            per_task = statistics.median(chain_times) / args.chain
            one_by_one = results["gateway_sidecar"]["p50_ms"] / 1000
            wide = [{"id": f"w{i}", "server": "bench", "tool": "echo", "arguments": {"text": "hello"}}
                    for i in range(args.chain)]
            t0 = time.perf_counter()
            async with http.post(f"{registry}/v1/workflows?wait=true", json={"tasks": wide}) as resp:
                assert (await resp.json())["state"] == "succeeded"
            wide_time = time.perf_counter() - t0
            workflow = {
                "chain_tasks": args.chain,
                "chain_ms_per_task": round(per_task * 1000, 3),
                "gateway_call_p50_ms": round(one_by_one * 1000, 3),
                "overhead_ms_per_task": round((per_task - one_by_one) * 1000, 3),
                "scheduling_ms_per_task": round(statistics.median(scheduling), 4),
                "parallel_tasks": args.chain,
                "parallel_total_ms": round(wide_time * 1000, 3),
                "note": "chain: each task depends on the previous one; overhead = per-task time minus a client's "
                        "gateway tools/call p50 (negative: a task costs less than a call from outside). "
                        "scheduling: time in the scheduler itself (dependencies, slot, context), per task. "
                        "parallel: independent tasks on one server (maxConcurrent 3).",
            }

            # tools/list over 100 servers x 20 tools fed by heartbeats (the tools themselves are never called).
            for s in range(args.servers):
                beat = {"server": f"s{s:03d}", "endpoint": f"http://127.0.0.1:1/s{s}/mcp", "tools": [
                    {"name": f"tool_{t:02d}", "description": f"Tool {t} of server {s}.",
                     "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}}}
                    for t in range(args.tools)]}
                async with http.post(f"{registry}/v1/heartbeats", json=beat) as resp:
                    assert resp.status == 200
            listed_now = await gate.rpc("tools/list", {})
            count = len(listed_now["result"]["tools"])
            listing = await latency(gate, "tools/list", {}, args.list_calls, 20, parse=False)
            listing.update(servers=args.servers + 1, tools_listed=count)
            return {"tools_call": results, "workflow": workflow, "tools_list": listing}
    finally:
        for proc in procs:
            stop(proc)


async def measure_expiry(rounds: int, logs: Path) -> dict:
    """A killed sidecar's tools leave after missed heartbeats: seconds from its last heartbeat and from the kill,
    with the registry's default 5 s interval and limit of 3 (so 15 s after the last beat is the target)."""
    since_beat, since_kill = [], []
    for n in range(rounds):
        up_port, sc_port, reg_port = free_port(), free_port(), free_port()
        registry = f"http://127.0.0.1:{reg_port}"
        upstream = start([sys.executable, str(BENCH / "upstream.py"), "--port", str(up_port)], logs / "upstream.log")
        reg = start([str(BIN / "toolmesh"), "registry", "--listen", f"127.0.0.1:{reg_port}", "--insecure"],
                    logs / "registry.log")
        sidecar = start([str(BIN / "toolmesh"), "sidecar", "--upstream", f"http://127.0.0.1:{up_port}/mcp", "--listen",
                         f"127.0.0.1:{sc_port}", "--server-name", "bench", "--registry", registry],
                        logs / "sidecar.log")
        try:
            async with aiohttp.ClientSession() as http:
                async def names() -> list[str]:
                    async with http.get(f"{registry}/v1/tools") as resp:
                        return [t["name"] for t in (await resp.json())["tools"]]

                async def listed() -> bool:
                    return "bench__echo" in await names()

                await wait_for(listed, "the sidecar's heartbeat")
                await asyncio.sleep(n * 1.7 % 5)  # kills land at different points of the heartbeat cycle
                os.killpg(sidecar.pid, signal.SIGKILL)
                killed = time.time()
                deadline = time.monotonic() + 30
                while "bench__echo" in await names() and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                gone = time.time()
                async with http.get(f"{registry}/v1/servers") as resp:
                    (server,) = (await resp.json())["servers"]
                since_beat.append(gone - server["instances"][0]["lastHeartbeat"])
                since_kill.append(gone - killed)
        finally:
            for proc in (sidecar, reg, upstream):
                stop(proc)
    return {"heartbeat_interval_s": 5.0, "missed_limit": 3, "rounds": rounds,
            "gone_after_last_heartbeat_s": [round(x, 3) for x in since_beat],
            "gone_after_kill_s": [round(x, 3) for x in since_kill],
            "max_gone_after_kill_s": round(max(since_kill), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--chain", type=int, default=50)
    parser.add_argument("--workflow-runs", type=int, default=5)
    parser.add_argument("--servers", type=int, default=100)
    parser.add_argument("--tools", type=int, default=20)
    parser.add_argument("--list-calls", type=int, default=200)
    parser.add_argument("--expiry-rounds", type=int, default=3)
    parser.add_argument("--only", choices=("expiry",), help="measure only this part (merged into --out)")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "gateway.json")
    args = parser.parse_args()
    logs = BENCH / "tmp" / "gateway-bench"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    measured = {} if args.only else asyncio.run(measure(args, logs))
    expiry = asyncio.run(measure_expiry(args.expiry_rounds, logs))
    measured["expiry"] = {**expiry, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not args.only:
        measured["measured_by"] = "bench/gateway_bench.py"
        measured["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        measured["loadavg_at_end"] = list(os.getloadavg())
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc.update(measured)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(measured, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
