"""The sidecar benchmark: tools/call latency, throughput, CPU per call, memory and start-up through each proxy, against the same upstream.

Run by bench/run.sh (which prepares wrk and the comparison proxies' venvs):

    bench/run.sh [--quick] [TARGET ...]      # targets: see TARGETS; default all

Load comes from wrk (C, outside any Python event loop) with bench/mcp_call.lua;
latency at concurrency 1 (`-t1 -c1`), throughput at 16 and 64 connections.
CPU per call is the proxy's own processes' CPU time (from /proc) over a
throughput run divided by the calls it served. Results are merged into
bench/results/sidecar.json target by target, so a partial run keeps the rest.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
LUA = BENCH / "mcp_call.lua"
MAIN_PY = ROOT / ".venv" / "bin" / "python"
TOOLMESH = ROOT / ".venv" / "bin" / "toolmesh"
FASTMCP_PY = BENCH / ".venv" / "bin" / "python"
MCP_PROXY = BENCH / ".venv-mcp-proxy" / "bin" / "mcp-proxy"
PROTOCOL = "2025-11-25"
ECHO_TEXT = "hello from wrk"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --- processes ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root: int) -> list[int]:
    """`root` and every descendant, from /proc (a proxy may run its upstream client as a child)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLOCK_TICKS


def rss_mb(pids: list[int]) -> float:
    total_pages = 0
    for pid in pids:
        try:
            total_pages += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except OSError:
            continue
    return total_pages * PAGE_KB / 1024


class Managed:
    """A benchmarked process in its own process group, stopped with its children."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = open(log, "wb")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=full_env, cwd=ROOT, start_new_session=True)

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._out.close()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]


# --- MCP over HTTP, just enough to open a session --------------------------------------------------

def post(url: str, message: dict, headers: dict[str, str], timeout: float = 10) -> tuple[int, dict[str, str], dict | None]:
    request = urllib.request.Request(url, data=json.dumps(message).encode(), method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, body = response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, head, body = exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode(errors="replace")
    if not body.strip():
        return status, head, None
    if "text/event-stream" in head.get("content-type", ""):
        # The answer is the last `data:` line that carries this request's id.
        payloads = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:") and line[5:].strip()]
        replies = [p for p in payloads if isinstance(p, dict) and p.get("id") == message.get("id")]
        return status, head, replies[-1] if replies else None
    return status, head, json.loads(body)


@dataclass
class Session:
    session_id: str
    version: str


def open_session(url: str, token: str = "") -> Session:
    """initialize + notifications/initialized, then one echo call that must come back intact."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    status, head, reply = post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "toolmesh-bench", "version": "1"}}}, auth)
    if status != 200 or not reply or "result" not in reply:
        raise RuntimeError(f"initialize failed: HTTP {status} {reply}")
    session_id = head.get("mcp-session-id", "")
    version = reply["result"].get("protocolVersion", PROTOCOL)
    headers = {**auth, "MCP-Protocol-Version": version, **({"Mcp-Session-Id": session_id} if session_id else {})}
    try:
        post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
        # As a real client does before calling: it also tells a proxy the tools' annotations (read-only echo).
        status, _, reply = post(url, {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, headers)
        if status != 200 or "echo" not in json.dumps(reply):
            raise RuntimeError(f"tools/list through the proxy failed: HTTP {status} {reply}")
        status, _, reply = post(url, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                      "params": {"name": "echo", "arguments": {"text": ECHO_TEXT}}}, headers)
        if status != 200 or ECHO_TEXT not in json.dumps(reply):
            raise RuntimeError(f"echo through the proxy failed: HTTP {status} {reply}")
    except (OSError, RuntimeError, ValueError):
        if session_id:
            # A readiness poll retries every few ms: a session left open by each failed try would fill the
            # gateway's per-caller session cap before the sidecar's first heartbeat lands.
            end_session(url, headers)
        raise
    return Session(session_id, version)


def end_session(url: str, headers: dict[str, str]) -> None:
    request = urllib.request.Request(url, method="DELETE", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5):
            pass
    except (OSError, urllib.error.HTTPError):
        pass


def upstream_calls(upstream: str) -> int:
    """tools/call requests the upstream has answered so far (bench/upstream.py's /stats)."""
    with urllib.request.urlopen(upstream.rsplit("/mcp", 1)[0] + "/stats", timeout=5) as response:
        return json.loads(response.read())["tools/call"]


STATELESS = "2026-07-28"
STATELESS_META = {"io.modelcontextprotocol/protocolVersion": STATELESS, "io.modelcontextprotocol/clientCapabilities": {},
                  "io.modelcontextprotocol/clientInfo": {"name": "toolmesh-bench", "version": "1"}}


def stateless_call(url: str, token: str = "") -> Session:
    """One 2026-07-28 request, no session: `_meta` in the params, routing headers beside them."""
    headers = {"MCP-Protocol-Version": STATELESS, "Mcp-Method": "tools/call", "Mcp-Name": "echo",
               **({"Authorization": f"Bearer {token}"} if token else {})}
    status, _, reply = post(url, {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"text": ECHO_TEXT}, "_meta": STATELESS_META}}, headers)
    if status != 200 or ECHO_TEXT not in json.dumps(reply):
        raise RuntimeError(f"stateless echo failed: HTTP {status} {reply}")
    return Session("", STATELESS)


def connect(target: Target, url: str, token: str) -> Session:
    return stateless_call(url, token) if target.load_env.get("MCP_ERA") == "stateless" else open_session(url, token)


def wait_ready(check: Callable[[], bool], proc: Managed, timeout: float = 60) -> float:
    """Seconds from spawn until `check` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"process exited with {proc.proc.returncode}:\n{proc.tail()}")
        try:
            if check():
                return time.monotonic() - proc.started
        except (OSError, RuntimeError, ValueError):
            pass
        time.sleep(0.005)
    raise RuntimeError(f"not ready after {timeout}s:\n{proc.tail()}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False


# --- load --------------------------------------------------------------------------------------

def wrk(url: str, session: Session, connections: int, seconds: float, token: str = "",
        load_env: dict[str, str] | None = None) -> dict:
    threads = 1 if connections == 1 else 2
    env = dict(os.environ, MCP_SESSION=session.session_id, MCP_VERSION=session.version, MCP_TOKEN=token,
               MCP_EXPECT=ECHO_TEXT)
    env.update(load_env or {})
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(LUA), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    line = next((l for l in out.stdout.splitlines() if l.startswith("WRK_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {out.stdout[-1000:]} {out.stderr[-1000:]}")
    result = json.loads(line[len("WRK_RESULT "):])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


class RssSampler(threading.Thread):
    """Peak RSS of a process tree while load runs."""

    def __init__(self, proc: Managed) -> None:
        super().__init__(daemon=True)
        self.proc, self.peak, self._done = proc, 0.0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            self.peak = max(self.peak, rss_mb(self.proc.pids()))

    def finish(self) -> float:
        self._done.set()
        self.join()
        return self.peak


# --- targets -----------------------------------------------------------------------------------

@dataclass
class Target:
    """How to start one proxy in front of the upstream."""

    description: str
    command: Callable[[str, int], list[str]] | None
    """(upstream URL, port) -> argv; None measures the upstream itself."""
    ready_path: str | None = None
    """GET path that answers 200 once ready; None: ready when a session opens."""
    needs: list[Path] = field(default_factory=list)
    token: Callable[[], str] | None = None
    env: Callable[[str], dict[str, str]] = lambda upstream: {}
    """Upstream URL -> extra environment for the proxy process."""
    load_env: dict[str, str] = field(default_factory=dict)
    """Extra environment for bench/mcp_call.lua (e.g. MCP_VARY=1)."""
    stdio: bool = False
    """The proxy spawns the server itself: `command` gets a stdio server command line instead of a URL."""
    reference: str = "direct"
    """The target this one is compared with (the same load, straight to the upstream)."""


def sidecar(*extra: str) -> Callable[[str, int], list[str]]:
    return lambda upstream, port: [str(TOOLMESH), "sidecar", "--upstream", upstream,
                                   "--listen", f"127.0.0.1:{port}", *extra]


def gateway_chain(upstream: str, port: int) -> list[str]:
    """The registry's gateway on `port`, routing to a sidecar that registered itself with heartbeats."""
    sidecar_port = free_port()
    # The registry refuses heartbeats without a credential: both get a fresh shared secret.
    return ["bash", "-c", f"export TOOLMESH_REGISTRY_SECRET={secrets.token_hex(16)}; "
                          f"{TOOLMESH} registry --listen 127.0.0.1:{port} & exec {TOOLMESH} sidecar --upstream "
                          f"{upstream} --listen 127.0.0.1:{sidecar_port} --registry http://127.0.0.1:{port} "
                          f"--server-name bench"]


def fastmcp_proxy(*extra: str) -> Callable[[str, int], list[str]]:
    return lambda upstream, port: [str(FASTMCP_PY), str(BENCH / "fastmcp_proxy.py"), "--upstream", upstream,
                                   "--port", str(port), *extra]


_REDIS: list[subprocess.Popen] = []


def redis_url() -> str:
    """A redis-server for the shared-store targets, started once per run on a Unix socket, stopped at exit."""
    sock = BENCH / "tmp" / "redis.sock"
    if not _REDIS or _REDIS[0].poll() is not None:
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "",
                                 "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(proc.kill)
        _REDIS[:] = [proc]
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start (make system-deps installs it)")
            time.sleep(0.01)
    return f"unix://{sock}"


STATELESS_LOAD = {"MCP_ERA": "stateless"}

TARGETS: dict[str, Target] = {
    "direct": Target("the upstream itself", None),
    "direct-stateless": Target("the upstream itself, 2026-07-28 stateless requests", None, load_env=STATELESS_LOAD),
    "sidecar-stateless": Target("toolmesh sidecar, pass-through, 2026-07-28 stateless requests", sidecar(), "/readyz",
                                [TOOLMESH], load_env=STATELESS_LOAD, reference="direct-stateless"),
    "sidecar": Target("toolmesh sidecar, pass-through with observability", sidecar(), "/readyz", [TOOLMESH]),
    "sidecar-quiet": Target("toolmesh sidecar, pass-through, per-call log lines off (--log-level WARNING)",
                            sidecar("--log-level", "WARNING"), "/readyz", [TOOLMESH]),
    "sidecar-traced": Target("toolmesh sidecar, pass-through, OpenTelemetry spans and metrics exported over OTLP/HTTP",
                             sidecar(), "/readyz", [TOOLMESH],
                             env=lambda upstream: {"OTEL_EXPORTER_OTLP_ENDPOINT": upstream.rsplit("/mcp", 1)[0]}),
    "sidecar-stdio": Target("toolmesh sidecar bridging a stdio echo server it spawns (CPU includes the server)",
                            lambda command, port: [str(TOOLMESH), "sidecar", "--upstream-command", command,
                                                   "--listen", f"127.0.0.1:{port}"], "/readyz", [TOOLMESH], stdio=True),
    "gateway-call": Target("agent -> gateway -> sidecar -> upstream (CPU and memory of registry + sidecar)",
                           gateway_chain, None, [TOOLMESH]),
    "fastmcp": Target("FastMCP 4.2.3 create_proxy(url)", fastmcp_proxy(), None, [FASTMCP_PY]),
    "fastmcp-connected": Target("FastMCP 4.2.3 proxy sharing one connected client", fastmcp_proxy("--connected"),
                                None, [FASTMCP_PY]),
    "fastmcp-middleware": Target("FastMCP 4.2.3 connected proxy with its response cache and retry middleware, "
                                 "every call a cache miss", fastmcp_proxy("--connected", "--middleware"), None,
                                 [FASTMCP_PY], load_env={"MCP_VARY": "1"}),
    "fastmcp-middleware-hit": Target("FastMCP 4.2.3 connected proxy with its response cache and retry middleware, "
                                     "every call after the first a cache hit",
                                     fastmcp_proxy("--connected", "--middleware"), None, [FASTMCP_PY]),
    "mcp-proxy": Target("mcp-proxy 0.13.0, HTTP -> stdio -> HTTP (two processes)",
                        lambda u, p: [str(MCP_PROXY), "--port", str(p), "--log-level", "WARNING", "--",
                                      str(MCP_PROXY), "--transport", "streamablehttp", "--log-level", "WARNING", u],
                        None, [MCP_PROXY]),
}
# Policy-on modes: one target per file in bench/policies/, named sidecar-<file stem>.
POLICY_DIR = BENCH / "policies"
POLICY_LOAD = {"full": {"MCP_VARY": "1"}}  # full.yaml measures cache misses: every call's arguments differ
for policy in sorted(POLICY_DIR.glob("*.yaml")):
    TARGETS[f"sidecar-{policy.stem}"] = Target(
        f"toolmesh sidecar with bench/policies/{policy.name}", sidecar("--policy", str(policy)), "/readyz",
        [TOOLMESH], token=(lambda p=policy: bench_token(p)), load_env=POLICY_LOAD.get(policy.stem, {}))
# The same full policy with its rate limit in a shared redis-server: what one round trip per call costs.
TARGETS["sidecar-full-redis"] = Target(
    "toolmesh sidecar with bench/policies/full.yaml, rate limit shared through redis-server (--state-redis-url)",
    lambda upstream, port: sidecar("--policy", str(POLICY_DIR / "full.yaml"),
                                   "--state-redis-url", redis_url())(upstream, port),
    "/readyz", [TOOLMESH], token=lambda: bench_token(POLICY_DIR / "full.yaml"), load_env=POLICY_LOAD["full"])


def bench_token(policy: Path) -> str:
    """A bearer token the policy's first HMAC issuer accepts, with every scope the benchmark calls need ('' without auth)."""
    import jwt
    import yaml

    spec = yaml.safe_load(policy.read_text()).get("spec", {})
    issuers = (spec.get("auth") or {}).get("issuers") or []
    if not issuers:
        return ""
    issuer = issuers[0]
    now = int(time.time())
    claims = {"iss": issuer["issuer"], "aud": issuer["audiences"][0], "sub": "toolmesh-bench", "iat": now,
              "nbf": now, "exp": now + 24 * 3600, "scope": "mcp:admin tools:echo"}
    return jwt.encode(claims, issuer["secret"], algorithm="HS256")


# --- one target --------------------------------------------------------------------------------

def stdio_server(script: Path) -> str:
    return f"{MAIN_PY} {script} --stdio"


def measure(name: str, target: Target, upstream: str, upstream_proc: Managed, seconds: float, warmup: float,
            logs: Path, ready_runs: int = 1) -> dict:
    """One target's figures; `ready_s` is the median over `ready_runs` fresh starts."""
    token = target.token() if target.token else ""
    if target.command is None:
        proc, url = upstream_proc, upstream
        ready_s = None
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}/mcp"
        spawned = stdio_server(BENCH / "upstream.py") if target.stdio else upstream
        proc = Managed(target.command(spawned, port), logs / f"{name}.log", target.env(upstream))
    try:
        if target.command is not None:
            if target.ready_path:
                ready_s = wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}{target.ready_path}"), proc)
            else:
                ready_s = wait_ready(lambda: bool(connect(target, url, token)), proc)
        session = connect(target, url, token)
        if target.command is not None and target.ready_path and ready_runs > 1:
            ready_all = [round(ready_s, 3), *ready_times(target, upstream, ready_runs - 1, logs)]
            ready_s = sorted(ready_all)[len(ready_all) // 2]
        time.sleep(1.0)  # let start-up garbage settle before reading idle memory
        result: dict = {"description": target.description, "ready_s": ready_s,
                        "rss_idle_mb": round(rss_mb(proc.pids()), 1),
                        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if target.command is not None and target.ready_path and ready_runs > 1:
            result["ready_runs_s"] = sorted(ready_all)
        if warmup:
            wrk(url, session, 4, warmup, token, target.load_env)
        c1 = wrk(url, session, 1, seconds, token, target.load_env)
        result["c1"] = {"p50_ms": c1["latency_us"]["p50"] / 1000, "p90_ms": c1["latency_us"]["p90"] / 1000,
                        "p99_ms": c1["latency_us"]["p99"] / 1000, "rps": round(c1["rps"], 1),
                        "failed": c1["bad_answers"] + c1["socket_errors"] + c1["timeouts"]}
        print(f"  {name}: c=1 p50 {result['c1']['p50_ms']:.3f} ms  p99 {result['c1']['p99_ms']:.3f} ms", flush=True)
        for connections in (16, 64):
            sampler = RssSampler(proc)
            sampler.start()
            cpu_before, upstream_before = cpu_seconds(proc.pids()), upstream_calls(upstream)
            run = wrk(url, session, connections, seconds, token, target.load_env)
            cpu = cpu_seconds(proc.pids()) - cpu_before
            reached = upstream_calls(upstream) - upstream_before
            peak = sampler.finish()
            served = run["requests"]
            result[f"c{connections}"] = {
                "rps": round(run["rps"], 1), "p50_ms": run["latency_us"]["p50"] / 1000,
                "p99_ms": run["latency_us"]["p99"] / 1000,
                "cpu_ms_per_call": round(cpu / served * 1000, 4) if served else None,
                "failed": run["bad_answers"] + run["socket_errors"] + run["timeouts"],
                "bad_sample": run["bad_sample"],
                # Below 1 when a cache answered; calls cut off when wrk stops may reach upstream unanswered.
                "upstream_calls_per_call": round(reached / served, 3) if served and not target.stdio else None}
            result["rss_load_mb"] = round(max(peak, result.get("rss_load_mb", 0)), 1)
            print(f"  {name}: c={connections} {run['rps']:.0f} calls/s, "
                  f"{result[f'c{connections}']['cpu_ms_per_call']} ms CPU per call, "
                  f"{result[f'c{connections}']['failed']} failed", flush=True)
        return result
    finally:
        if proc is not upstream_proc:
            proc.stop()


def ready_times(target: Target, upstream: str, runs: int, logs: Path) -> list[float]:
    """Spawn-to-ready seconds over several fresh starts (the first start of a run pays for cold caches)."""
    times = []
    for _ in range(runs):
        port = free_port()
        spawned = stdio_server(BENCH / "upstream.py") if target.stdio else upstream
        proc = Managed(target.command(spawned, port), logs / "ready.log", target.env(upstream))
        try:
            times.append(round(wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}{target.ready_path}"), proc), 3))
        finally:
            proc.stop()
    return times


def soak(target: Target, upstream: str, minutes: float, logs: Path) -> dict:
    """RSS of a sidecar under steady load (16 connections) sampled every 5 s: does memory stay flat?"""
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    proc = Managed(target.command(upstream, port), logs / "soak.log", target.env(upstream))
    token = target.token() if target.token else ""
    try:
        wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}{target.ready_path}"), proc)
        session = open_session(url, token)
        env = dict(os.environ, MCP_SESSION=session.session_id, MCP_VERSION=session.version, MCP_TOKEN=token,
                   MCP_EXPECT=ECHO_TEXT, **target.load_env)
        load = subprocess.Popen(["wrk", "-t2", "-c16", f"-d{round(minutes * 60)}s", "--timeout", "10s", "-s", str(LUA),
                                 url], env=env, stdout=subprocess.PIPE, text=True)
        samples, started = [], time.monotonic()
        while load.poll() is None:
            samples.append([round(time.monotonic() - started, 1), round(rss_mb(proc.pids()), 1)])
            time.sleep(5)
        out = load.stdout.read()
        line = next((l for l in out.splitlines() if l.startswith("WRK_RESULT ")), "WRK_RESULT {}")
        result = json.loads(line[len("WRK_RESULT "):])
    finally:
        proc.stop()
    # Growth is judged after the first minute, once pools, caches and the allocator have warmed up.
    settled = [rss for t, rss in samples if t >= 60] or [rss for _, rss in samples]
    return {"minutes": minutes, "calls": result.get("requests"), "failed": result.get("bad_answers"),
            "rss_mb": samples, "rss_settled_min_mb": min(settled), "rss_settled_max_mb": max(settled),
            "rss_growth_fraction": round((settled[-1] - settled[0]) / settled[0], 4)}


def median_of(rounds: list[dict]) -> dict:
    """Several rounds of one target folded into one result: the median of every figure, the rounds kept."""
    if len(rounds) == 1:
        return rounds[0]

    def fold(values: list):
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(values):
            return sorted(numbers)[len(numbers) // 2]
        if all(isinstance(v, dict) for v in values):
            return {key: fold([v.get(key) for v in values]) for key in values[0]}
        return values[-1]

    result = {key: fold([r.get(key) for r in rounds]) for key in rounds[0]}
    result["rounds"] = len(rounds)
    result["p50_ms_per_round"] = [r["c1"]["p50_ms"] for r in rounds]
    return result


def derive(results: dict) -> dict:
    """Added latency and relative throughput against the direct run; conformance kept, when measured."""
    kept_file = RESULTS / "conformance-proxies.json"
    kept = json.loads(kept_file.read_text())["targets"] if kept_file.exists() else {}
    derived = {}
    for name, r in results.items():
        if name.startswith("direct") or "c1" not in r:
            continue
        # Each target is compared with the direct run measured alongside it, even after later partial runs.
        direct = r.get("reference_direct") or results.get("direct")
        if not direct:
            continue
        derived[name] = {
            "added_p50_ms": round(r["c1"]["p50_ms"] - direct["c1"]["p50_ms"], 3),
            "added_p99_ms": round(r["c1"]["p99_ms"] - direct["c1"]["p99_ms"], 3),
            "c16_vs_direct": round(r["c16"]["rps"] / direct["c16"]["rps"], 3),
            "c64_vs_direct": round(r["c64"]["rps"] / direct["c64"]["rps"], 3),
            "conformance_kept": kept.get(name, {}).get("fraction_kept"),
        }
    return derived


def machine() -> dict:
    model = ""
    try:
        model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("model name")), "")
    except OSError:
        pass
    load = Path("/proc/loadavg").read_text().split()[:3]
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_start": load, "wrk": wrk_version[0] if wrk_version else ""}


def print_table(doc: dict) -> None:
    results, derived = doc["targets"], doc.get("derived", {})
    print(f"\n{'target':20s} {'p50 ms':>8s} {'p99 ms':>8s} {'+p50':>7s} {'+p99':>7s} {'c16/s':>8s} {'c64/s':>8s} "
          f"{'c64 %':>6s} {'CPU ms':>7s} {'RSS MB':>7s} {'load MB':>7s} {'ready s':>7s} {'conf %':>6s}")
    for name, r in results.items():
        if "c1" not in r:
            continue
        d = derived.get(name, {})
        ready = f"{r['ready_s']:.3f}" if r.get("ready_s") is not None else "-"
        conf = f"{100 * d['conformance_kept']:.0f}" if d.get("conformance_kept") is not None else "-"
        print(f"{name:20s} {r['c1']['p50_ms']:8.3f} {r['c1']['p99_ms']:8.3f} {d.get('added_p50_ms', 0):7.3f} "
              f"{d.get('added_p99_ms', 0):7.3f} {r['c16']['rps']:8.0f} {r['c64']['rps']:8.0f} "
              f"{100 * d.get('c64_vs_direct', 1):6.1f} {r['c16']['cpu_ms_per_call'] or 0:7.3f} {r['rss_idle_mb']:7.1f} "
              f"{r.get('rss_load_mb', 0):7.1f} {ready:>7s} {conf:>6s}")


def conformance(chosen: list[str], logs: Path, out: Path) -> int:
    """The official conformance suite through each proxy, against the SDK fixture server: which checks each keeps."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.conformance import lost_checks, run_suite, suite_installed

    if not suite_installed():
        print("the conformance suite is missing: run `make node-deps`", file=sys.stderr)
        return 2
    fixture_port = free_port()
    fixture_url = f"http://127.0.0.1:{fixture_port}/mcp"
    fixture = Managed([str(MAIN_PY), str(ROOT / "tests" / "conformance" / "fixture_server.py"), "--port",
                       str(fixture_port)], logs / "fixture.log")
    doc: dict = json.loads(out.read_text()) if out.exists() else {}  # merged target by target, like the load runs
    doc.update({"suite": "@modelcontextprotocol/conformance@0.2.0-alpha.11 --suite all"})
    doc.setdefault("targets", {})
    failures = 0
    try:
        wait_ready(lambda: bool(open_fixture(fixture_url)), fixture, timeout=60)
        print(f"==> direct: the fixture server at {fixture_url}", flush=True)
        direct = run_suite(fixture_url)
        doc["direct"] = direct.totals()
        for name in chosen:
            target = TARGETS[name]
            if target.command is None or target.token is not None:
                continue  # policy-on sidecars refuse the suite's anonymous client, by design
            if any(not p.exists() for p in target.needs):
                print(f"==> {name}: skipped, not installed", flush=True)
                continue
            port = free_port()
            behind = stdio_server(ROOT / "tests" / "conformance" / "fixture_server.py") if target.stdio else fixture_url
            proc = Managed(target.command(behind, port), logs / f"conformance-{name}.log", target.env(fixture_url))
            try:
                wait_ready(lambda: port_open(port), proc)
                time.sleep(0.5)  # a proxy listens before its upstream client has connected
                print(f"==> {name}: {target.description}", flush=True)
                run = run_suite(f"http://127.0.0.1:{port}/mcp")
            except Exception as exc:  # one broken proxy must not lose the others' numbers
                failures += 1
                print(f"==> {name}: FAILED {exc}", flush=True)
                continue
            finally:
                proc.stop()
            lost = lost_checks(direct, run)
            kept = len(direct.passed()) - len(lost)
            doc["targets"][name] = {"description": target.description, "totals": run.totals(), "kept": kept,
                                    "passing_direct": len(direct.passed()),
                                    "fraction_kept": round(kept / max(1, len(direct.passed())), 4),
                                    "lost": sorted(lost)}
            print(f"  {name}: keeps {kept}/{len(direct.passed())} checks that pass directly", flush=True)
    finally:
        fixture.stop()
    doc["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n==> wrote {out}")
    return 1 if failures else 0


def gateway(servers: int, tools_per_server: int, seconds: float, logs: Path, out: Path) -> int:
    """The registry's gateway answering tools/list over `servers` x `tools_per_server` tools, fed by heartbeats."""
    upstream_port, port = free_port(), free_port()
    upstream = Managed([str(MAIN_PY), str(BENCH / "upstream.py"), "--port", str(upstream_port),
                        "--tools", str(tools_per_server - 1)], logs / "gateway-upstream.log")
    # Heartbeats are sent once; a long interval keeps every instance healthy for the whole run.
    # Loopback only, and heartbeats are posted by hand: --insecure (no heartbeat credential) is enough.
    registry = Managed([str(TOOLMESH), "registry", "--listen", f"127.0.0.1:{port}", "--heartbeat-interval", "3600",
                        "--page-size", str(servers * tools_per_server + 100), "--insecure"],
                       logs / "gateway-registry.log", {"TOOLMESH_REGISTRY_SECRET": ""})
    try:
        wait_ready(lambda: bool(open_session(f"http://127.0.0.1:{upstream_port}/mcp")), upstream, timeout=30)
        wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), registry, timeout=60)
        _, _, listed = post(f"http://127.0.0.1:{upstream_port}/mcp", {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, {})
        tools = listed["result"]["tools"]
        for i in range(servers):
            status, _, _ = post(f"http://127.0.0.1:{port}/v1/heartbeats", {
                "server": f"srv{i:03d}", "instance": f"srv{i:03d}-0", "health": "ok",
                "endpoint": f"http://127.0.0.1:{upstream_port}/mcp", "tools": tools}, {})
            if status != 200:
                raise RuntimeError(f"heartbeat refused: HTTP {status}")
        url = f"http://127.0.0.1:{port}/mcp"
        last = f"srv{servers - 1:03d}__{tools[-1]['name']}"
        status, head, reply = post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "toolmesh-bench", "version": "1"}}}, {})
        session = Session(head.get("mcp-session-id", ""), (reply or {}).get("result", {}).get("protocolVersion", PROTOCOL))
        headers = {"MCP-Protocol-Version": session.version,
                   **({"Mcp-Session-Id": session.session_id} if session.session_id else {})}
        post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
        _, _, listed = post(url, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers)
        count = len(((listed or {}).get("result") or {}).get("tools") or [])
        print(f"==> gateway: {count} tools listed over {servers} servers x {tools_per_server}", flush=True)
        load_env = {"MCP_METHOD": "tools/list", "MCP_EXPECT": last}
        doc = {"servers": servers, "tools_per_server": tools_per_server, "tools_listed": count}
        for connections in (1, 16):
            cpu_before = cpu_seconds(registry.pids())
            run = wrk(url, session, connections, seconds, load_env=load_env)
            cpu = cpu_seconds(registry.pids()) - cpu_before
            doc[f"c{connections}"] = {"p50_ms": run["latency_us"]["p50"] / 1000, "p99_ms": run["latency_us"]["p99"] / 1000,
                                      "rps": round(run["rps"], 1),
                                      "cpu_ms_per_list": round(cpu / run["requests"] * 1000, 3) if run["requests"] else None,
                                      "failed": run["bad_answers"] + run["socket_errors"] + run["timeouts"],
                                      "bad_sample": run["bad_sample"]}
            print(f"  c={connections}: p50 {doc[f'c{connections}']['p50_ms']:.2f} ms, p99 "
                  f"{doc[f'c{connections}']['p99_ms']:.2f} ms, {run['rps']:.0f} lists/s, "
                  f"{doc[f'c{connections}']['failed']} failed", flush=True)
        doc["rss_mb"] = round(rss_mb(registry.pids()), 1)
    finally:
        registry.stop()
        upstream.stop()
    doc["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc["machine"] = machine()
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n==> wrote {out}")
    return 0 if count >= servers * tools_per_server and not doc["c1"]["failed"] else 1


def open_fixture(url: str) -> bool:
    status, _, reply = post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "toolmesh-bench", "version": "1"}}}, {})
    return status == 200 and bool(reply) and "result" in reply


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def markdown(doc: dict) -> str:
    """The results as the README's Performance table."""
    results, derived = doc["targets"], doc.get("derived", {})
    rows = ["| target | p50 / p99 ms (c=1) | added p50 / p99 ms | calls/s c=16 / c=64 | c=64 vs direct | "
            "CPU ms per call | RSS idle / load MB | ready s | conformance kept |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "c1" not in r:
            continue
        d = derived.get(name, {})
        kept = f"{100 * d['conformance_kept']:.0f} %" if d.get("conformance_kept") is not None else "—"
        added = f"{d['added_p50_ms']:.2f} / {d['added_p99_ms']:.2f}" if d else "—"
        ready = f"{r['ready_s']:.2f}" if r.get("ready_s") is not None else "—"
        cpu = r["c16"]["cpu_ms_per_call"]
        rows.append(f"| {name} | {r['c1']['p50_ms']:.2f} / {r['c1']['p99_ms']:.2f} | {added} | "
                    f"{r['c16']['rps']:.0f} / {r['c64']['rps']:.0f} | {100 * d.get('c64_vs_direct', 1):.1f} % | "
                    f"{'—' if cpu is None else f'{cpu:.3f}' if cpu < 1 else f'{cpu:.1f}'} | "
                    f"{r['rss_idle_mb']:.0f} / {r.get('rss_load_mb', 0):.0f} | "
                    f"{ready} | {kept} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"targets to measure (default: all): {', '.join(TARGETS)}")
    parser.add_argument("--quick", action="store_true", help="2 s runs, for checking the harness itself")
    parser.add_argument("--seconds", type=float, help="length of each load run (default 10, quick 2)")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/sidecar.json, "
                                                 "or conformance-proxies.json with --conformance)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="measure every target N times, round-robin, and keep the medians (noisy machines)")
    parser.add_argument("--soak", type=float, metavar="MINUTES",
                        help="also hold the sidecar under load this long, sampling its memory (design: 10)")
    parser.add_argument("--markdown", action="store_true", help="print the last results as a Markdown table, run nothing")
    parser.add_argument("--gateway", action="store_true",
                        help="instead of the proxies, measure the gateway's tools/list over 100 servers x 20 tools")
    parser.add_argument("--conformance", action="store_true",
                        help="instead of load, run the conformance suite through each proxy: checks kept")
    args = parser.parse_args(argv)
    if args.markdown:
        doc = json.loads((args.out or RESULTS / "sidecar.json").read_text())
        doc["derived"] = derive(doc["targets"])
        print(markdown(doc))
        return 0
    chosen = args.targets or list(TARGETS)
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    for reference in sorted({TARGETS[name].reference for name in chosen}, reverse=True):
        if reference not in chosen:
            chosen.insert(0, reference)  # every comparison is against a direct run measured in the same run
    if shutil.which("wrk") is None:
        print("wrk is missing: run `make system-deps`", file=sys.stderr)
        return 2
    logs = BENCH / "tmp"
    logs.mkdir(exist_ok=True)
    if args.conformance:
        return conformance(chosen, logs, args.out or RESULTS / "conformance-proxies.json")
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    if args.gateway:
        return gateway(100, 20, seconds, logs, args.out or RESULTS / "gateway.json")
    args.out = args.out or RESULTS / "sidecar.json"
    warmup = 0.5 if args.quick else 2.0

    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}/mcp"
    upstream_proc = Managed([str(MAIN_PY), str(BENCH / "upstream.py"), "--port", str(upstream_port)],
                            logs / "upstream.log")
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc.setdefault("targets", {})
    failures = {}
    try:
        wait_ready(lambda: bool(open_session(upstream)), upstream_proc, timeout=30)
        print(f"==> upstream at {upstream}; {seconds:g} s per load run", flush=True)
        if args.soak:
            print(f"==> soak: toolmesh sidecar under 16 connections for {args.soak:g} min", flush=True)
            doc["soak"] = soak(TARGETS["sidecar"], upstream, args.soak, logs)
            print(f"  RSS {doc['soak']['rss_settled_min_mb']}..{doc['soak']['rss_settled_max_mb']} MB, growth "
                  f"{100 * doc['soak']['rss_growth_fraction']:.1f} %", flush=True)
        rounds: dict[str, list[dict]] = {}
        # Rounds go over every target in turn, so each sees the same share of whatever else the machine does.
        for round_number in range(args.repeat):
            for name in chosen:
                target = TARGETS[name]
                missing = [str(p) for p in target.needs if not p.exists()]
                if missing:
                    failures[name] = f"not installed: {', '.join(missing)}"
                    print(f"==> {name}: skipped, {failures[name]}", flush=True)
                    continue
                if name in failures:
                    continue
                print(f"==> {name}: {target.description}" + (f" (round {round_number + 1} of {args.repeat})"
                                                             if args.repeat > 1 else ""), flush=True)
                try:
                    rounds.setdefault(name, []).append(measure(name, target, upstream, upstream_proc, seconds, warmup,
                                                               logs, ready_runs=2 if args.quick else 5))
                except Exception as exc:  # one broken proxy must not lose the others' numbers
                    failures[name] = str(exc)[:2000]
                    print(f"==> {name}: FAILED {exc}", flush=True)
        for name, measured in rounds.items():
            if name not in failures:
                doc["targets"][name] = median_of(measured)
    finally:
        upstream_proc.stop()
    for name in chosen:
        reference = doc["targets"].get(TARGETS[name].reference)
        if TARGETS[name].command is not None and reference and "c1" in reference and name in doc["targets"] \
                and name not in failures:
            doc["targets"][name]["reference_direct"] = {key: reference[key] for key in ("c1", "c16", "c64")}
    doc.update({"mode": "quick" if args.quick else "full", "seconds_per_run": seconds, "machine": machine(),
                "load": "wrk, bench/mcp_call.lua: tools/call echo; c=1 with -t1, c=16/64 with -t2; one MCP session",
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    doc["derived"] = derive(doc["targets"])
    doc["failures"] = failures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(doc)
    print(f"\n==> wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
