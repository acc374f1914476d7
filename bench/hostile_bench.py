"""What a hostile caller costs everyone else: another client's call latency while floods arrive, and session memory.

    .venv/bin/python bench/hostile_bench.py [--out bench/results/hostile.json]

Figures (merged into the output file, keeping what other runs wrote there):
- "batch_flood": a sidecar with JWT auth in front of bench/upstream.py; one authenticated client pings in a loop
  while an anonymous one POSTs a 40,000-element batch (2.6 MB) again and again; the victim's latency p50/max
  with and without the flood, and how long each flood took to be refused.
- "gateway_sessions": RSS of `toolmesh registry` before and after 5,000 anonymous gateway initializes (they are
  capped per caller, so the figure also says how many were kept).
- "bridge_sessions": RSS of a sidecar bridging a stdio server before and after 5,000 bridge sessions.
Not a test: nothing is asserted. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_bench import ACCEPT, BIN, ROOT, free_port, start, stop, wait_for  # noqa: E402

SESSION_ERA = "2025-11-25"
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": SESSION_ERA, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def ready(http: aiohttp.ClientSession, url: str) -> bool:
    async with http.get(url) as resp:
        return resp.status == 200


async def batch_flood(tmp: Path, floods: int) -> dict:
    secret = secrets.token_hex(32)
    policy = tmp / "policy.yaml"
    policy.write_text(json.dumps({"auth": {"issuers": [{"issuer": "bench", "audiences": ["toolmesh"],
                                                         "secret": secret, "algorithms": ["HS256"]}]},
                                  "authorization": {"rules": [{"tools": ["*"], "scopes": []}]}}))
    import jwt

    now = int(time.time())
    token = jwt.encode({"iss": "bench", "aud": "toolmesh", "sub": "victim", "iat": now, "exp": now + 3600},
                       secret, algorithm="HS256")
    up_port, sc_port = free_port(), free_port()
    upstream = start([str(BIN / "python"), str(ROOT / "bench" / "upstream.py"), "--port", str(up_port)],
                     tmp / "upstream.log")
    sidecar = start([str(BIN / "toolmesh"), "sidecar", "--upstream", f"http://127.0.0.1:{up_port}/mcp",
                     "--listen", f"127.0.0.1:{sc_port}", "--policy", str(policy)], tmp / "sidecar.log")
    url = f"http://127.0.0.1:{sc_port}/mcp"
    flood = orjson.dumps([{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(40_000)])
    try:
        async with aiohttp.ClientSession() as http:
            await wait_for(lambda: ready(http, f"http://127.0.0.1:{sc_port}/readyz"), "sidecar ready")
            headers = {**ACCEPT, "Authorization": f"Bearer {token}", "MCP-Protocol-Version": SESSION_ERA}
            async with http.post(url, data=orjson.dumps(INIT), headers=headers) as resp:
                headers["Mcp-Session-Id"] = resp.headers["Mcp-Session-Id"]
            ping = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"})

            async def victim(done: asyncio.Event, latencies: list[float]) -> None:
                while not done.is_set():
                    started = time.perf_counter()
                    async with http.post(url, data=ping, headers=headers) as resp:
                        await resp.read()
                    latencies.append(time.perf_counter() - started)

            quiet: list[float] = []
            done = asyncio.Event()
            task = asyncio.create_task(victim(done, quiet))
            await asyncio.sleep(2.0)
            done.set()
            await task

            flooded: list[float] = []
            refusals: list[float] = []
            statuses: set[int] = set()
            done = asyncio.Event()
            task = asyncio.create_task(victim(done, flooded))
            async with aiohttp.ClientSession() as attacker:
                for _ in range(floods):
                    started = time.perf_counter()
                    async with attacker.post(url, data=flood, headers={"Content-Type": "application/json",
                                                                      "Accept": ACCEPT["Accept"]}) as resp:
                        await resp.read()
                        statuses.add(resp.status)
                    refusals.append(time.perf_counter() - started)
            done.set()
            await task
    finally:
        stop(sidecar)
        stop(upstream)

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"batch_elements": 40_000, "batch_bytes": len(flood), "floods": floods, "flood_status": sorted(statuses),
            "flood_refused_ms_median": round(statistics.median(refusals) * 1000, 2),
            "victim_quiet_p50_ms": ms(quiet, 0.5), "victim_quiet_max_ms": ms(quiet, 1.0),
            "victim_flooded_p50_ms": ms(flooded, 0.5), "victim_flooded_p99_ms": ms(flooded, 0.99),
            "victim_flooded_max_ms": ms(flooded, 1.0), "victim_calls_during_floods": len(flooded)}


async def gateway_sessions(tmp: Path, count: int) -> dict:
    port = free_port()
    secret_file = tmp / "registry-secret"
    secret_file.write_text(secrets.token_hex(16))
    registry = start([str(BIN / "toolmesh"), "registry", "--listen", f"127.0.0.1:{port}",
                      "--registry-secret-file", str(secret_file)], tmp / "registry.log")
    url = f"http://127.0.0.1:{port}/mcp"
    kept = refused = 0
    try:
        async with aiohttp.ClientSession() as http:
            await wait_for(lambda: ready(http, f"http://127.0.0.1:{port}/healthz"), "registry up")
            before = rss_mb(registry.pid)
            body = orjson.dumps(INIT)
            started = time.perf_counter()
            for _ in range(count):
                async with http.post(url, data=body, headers=ACCEPT) as resp:
                    await resp.read()
                    if resp.status == 200:
                        kept += 1
                    else:
                        refused += 1
            seconds = time.perf_counter() - started
            after = rss_mb(registry.pid)
    finally:
        stop(registry)
    return {"initializes": count, "sessions_kept": kept, "refused": refused,
            "initializes_per_s": round(count / seconds), "rss_before_mb": round(before, 1),
            "rss_after_mb": round(after, 1), "rss_growth_mb": round(after - before, 1)}


async def bridge_sessions(tmp: Path, count: int) -> dict:
    port = free_port()
    sidecar = start([str(BIN / "toolmesh"), "sidecar", "--upstream-command",
                     f"{BIN / 'python'} {ROOT / 'bench' / 'upstream.py'} --stdio",
                     "--listen", f"127.0.0.1:{port}"], tmp / "bridge.log")
    url = f"http://127.0.0.1:{port}/mcp"
    kept = 0
    try:
        async with aiohttp.ClientSession() as http:
            await wait_for(lambda: ready(http, f"http://127.0.0.1:{port}/readyz"), "bridge ready")
            before = rss_mb(sidecar.pid)
            body = orjson.dumps(INIT)
            for _ in range(count):
                async with http.post(url, data=body, headers=ACCEPT) as resp:
                    await resp.read()
                    kept += resp.status == 200
            after = rss_mb(sidecar.pid)
    finally:
        stop(sidecar)
    return {"sessions": count, "opened": kept, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "rss_growth_mb": round(after - before, 1),
            "bytes_per_session": round((after - before) * 1024 * 1024 / max(1, kept))}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "hostile.json"))
    parser.add_argument("--floods", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=5000)
    args = parser.parse_args()
    tmp = Path("/tmp/toolmesh-hostile-bench")
    tmp.mkdir(exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["batch_flood"] = await batch_flood(tmp, args.floods)
    print(json.dumps(results["batch_flood"], indent=1), flush=True)
    results["gateway_sessions"] = await gateway_sessions(tmp, args.sessions)
    print(json.dumps(results["gateway_sessions"], indent=1), flush=True)
    results["bridge_sessions"] = await bridge_sessions(tmp, args.sessions)
    print(json.dumps(results["bridge_sessions"], indent=1), flush=True)
    results["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
