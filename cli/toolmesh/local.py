"""`toolmesh up`: run MCPServer/MCPToolPolicy manifests as local processes behind sidecars, with the gateway.

The same files `kubectl apply` takes. Each MCPServer's `command`/`args`/`env`
run on this machine (stdio servers are spawned by their sidecar; HTTP servers
get a free port in `$PORT` and `$(PORT)` in their args), each behind its own
`toolmesh sidecar` with the merged policies that select it, all reporting to
the registry and gateway served in this process. A server that fails to
start is reported with the end of its log while the rest run; a process that
exits later is restarted with backoff; a changed manifest is applied while
running; Ctrl-C stops everything.

Ports: a sidecar binds its own (`--listen 127.0.0.1:0 --port-file`; its last
port again on a restart while that is free) and says which, so nothing can take
it in between. A user's HTTP server reads `$PORT`: that port is chosen by
binding a socket to port 0 and kept bound (with SO_REUSEADDR, never listening)
until the child listens on it, so the kernel hands it to no other `bind(0)` or
outgoing connection meanwhile; a server that still finds it taken (or a foreign
listener on it) is started again on another.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toolmesh.api.server import API_VERSION, MCPServerSpec, Transport

STOP_GRACE = 5.0
"""Seconds a process gets between SIGTERM and SIGKILL."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="manifest files or folders")
    parser.add_argument("--listen", default="127.0.0.1:7401", metavar="HOST:PORT",
                        help="where the registry and gateway listen (default 127.0.0.1:7401)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="SECONDS",
                        help="sidecar heartbeat interval (default 1; a stopped server leaves after 3)")
    parser.add_argument("--start-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long a server may take to list its tools before it is reported failed")
    parser.add_argument("--log-dir", type=Path, metavar="DIR", help="where process logs go (default: a new temp dir)")
    parser.add_argument("--otlp-relay", metavar="URL",
                        help="pass the traces the registry receives on to this OTLP/HTTP collector too")


# -- the plan: what the manifests ask for ----------------------------------------------------------------


@dataclass(frozen=True)
class ServerPlan:
    """One MCPServer as this machine will run it."""

    name: str
    spec: MCPServerSpec
    labels: tuple[tuple[str, str], ...]
    folder: Path
    """The manifest's folder: relative paths in the command are relative to it, and it is the working directory."""
    policy: Mapping[str, Any] | None
    """The merged policy spec (None when the merge is invalid; see `policy_error`)."""
    policy_error: str | None = None
    applied: tuple[str, ...] = ()
    manifest: Path | None = field(default=None, compare=False)
    """The file that defines the server: touching it starts a failed server again."""


def load_plan(paths: Sequence[Path]) -> tuple[dict[str, ServerPlan], list[str]]:
    """Servers with their merged policies; raises ValueError on unreadable or invalid manifests."""
    from toolmesh.operator.merge import PolicySource, merge_policies
    from toolmesh.registry.manifests import documents, server_spec

    servers: list[tuple[str, MCPServerSpec, dict[str, str], Path]] = []
    files: dict[str, Path] = {}
    policies: list[PolicySource] = []
    warnings: list[str] = []
    for file, doc in documents(paths):
        kind = doc.get("kind")
        if kind == "MCPServer":
            name, spec = server_spec(file, doc)
            if "__" in name:
                raise ValueError(f"{file}: MCPServer name {name!r} must not contain '__' (the gateway's separator)")
            if not spec.command:
                raise ValueError(f"{file}: MCPServer {name} has no spec.command, which local mode runs")
            labels = {str(k): str(v) for k, v in ((doc.get("metadata") or {}).get("labels") or {}).items()}
            servers.append((name, spec, labels, file.parent.resolve()))
            files[name] = file
        elif kind == "MCPToolPolicy":
            source = PolicySource.from_body(doc)
            if not source.valid:
                raise ValueError(f"{file}: MCPToolPolicy {source.name}: {source.error}")
            policies.append(source)
        else:
            warnings.append(f"{file}: ignoring kind {kind!r}")
    names = [s[0] for s in servers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"MCPServer defined more than once: {', '.join(duplicates)}")
    plans = {}
    for name, spec, labels, folder in servers:
        merged = merge_policies(policies, labels, spec.policy)
        plans[name] = ServerPlan(name, spec, tuple(sorted(labels.items())), folder,
                                 None if merged.error else merged.spec, merged.error, tuple(merged.applied),
                                 files[name])
    return plans, warnings


# -- running one server --------------------------------------------------------------------------------


PORT_ATTEMPTS = 5
"""Starts of one process on fresh ports when another process took the port first."""

RESTART_BACKOFF = (0.2, 10.0)
"""First and longest wait (seconds) before restarting a process that exited; doubles with each exit in a row."""

STABLE_AFTER = 10.0
"""A process that ran this long (seconds) before exiting restarts after the shortest wait again."""

_PORT_TAKEN = re.compile(rb"address already in use|EADDRINUSE", re.IGNORECASE)


def _reserve_port(port: int = 0) -> socket.socket | None:
    """A socket bound to 127.0.0.1:`port` (0: any), not listening: the port is ours until it is closed.

    While it is bound the kernel gives the port to no `bind(0)` and no outgoing connection, the usual
    thieves on a busy machine; SO_REUSEADDR lets our child (which sets it too, as servers do) bind it
    and listen. None when `port` is taken.
    """
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _listener_is_ours(port: int, session: int) -> bool:
    """False when a process outside `session` (our child's) listens on `port`; True if unknown (no /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return True
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rpartition(")")[2].split()[3]) != session:
                continue
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def _tail(path: Path, lines: int = 12, since: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def _port_taken(log: Path, since: int) -> bool:
    """Whether what a process wrote to `log` after offset `since` says its port was in use."""
    try:
        with open(log, "rb") as f:
            f.seek(since)
            return bool(_PORT_TAKEN.search(f.read()))
    except OSError:
        return False


def _failed_start(message: str, log: Path, since: int) -> StartFailed:
    """A start that failed, with what the process wrote to `log` after offset `since`."""
    tail = _tail(log, since=since)
    return StartFailed(message + (f"\n{tail}" if tail else ""))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _toolmesh_command() -> list[str]:
    script = Path(sys.executable).with_name("toolmesh")
    return [str(script)] if script.exists() else [sys.executable, "-m", "toolmesh"]


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the process group, SIGKILL after STOP_GRACE."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_GRACE)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


class StartFailed(Exception):
    """A process did not come up; the message says why (and the log's end follows it)."""


@dataclass
class LocalServer:
    """The processes of one MCPServer: its sidecar, and for HTTP transports the server itself."""

    plan: ServerPlan
    registry: str
    secret_file: Path
    """The registry's heartbeat secret, in a file readable by this user only (never in an environment variable, which
    a stdio server spawned by the sidecar would inherit)."""
    run_dir: Path
    say: Callable[[str], None] = print
    """Where lines for the person running `toolmesh up` go."""
    sidecar_port: int = 0
    server_port: int = 0
    server: asyncio.subprocess.Process | None = None
    """The HTTP server (None for stdio servers, which the sidecar spawns and restarts itself)."""
    sidecar: asyncio.subprocess.Process | None = None
    status: str = "starting"
    """starting → ready ⇄ restarting, or failed (see `failure`)."""
    failure: str | None = None
    restarts: int = 0
    """Restarts of the server by this process, or of a stdio server by its sidecar."""
    _stdio_log_seen: int = 0

    @property
    def sidecar_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar_port}/mcp"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar_port}/metrics"

    @property
    def policy_file(self) -> Path:
        return self.run_dir / f"{self.plan.name}.policy.yaml"

    @property
    def server_log(self) -> Path:
        return self.run_dir / f"{self.plan.name}.server.log"

    @property
    def sidecar_log(self) -> Path:
        return self.run_dir / f"{self.plan.name}.sidecar.log"

    def write_policy(self) -> None:
        """The merged policy as the sidecar reads it (re-read by the sidecar when it changes)."""
        manifest = {"apiVersion": API_VERSION, "kind": "MCPToolPolicy",
                    "metadata": {"name": f"{self.plan.name}-merged"}, "spec": dict(self.plan.policy or {})}
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
        tmp.replace(self.policy_file)  # atomic: the sidecar never reads half a file

    def _env(self, extra: Mapping[str, str] = {}) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("TOOLMESH_REGISTRY_SECRET", None)  # another registry's secret is not for our servers
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env.update({e.name: e.value for e in self.plan.spec.env})
        env.update(extra)
        return env

    def _command(self, port: int | None) -> list[str]:
        spec = self.plan.spec
        first = spec.command[0]
        if "/" in first and not os.path.isabs(first):
            first = str((self.plan.folder / first).resolve())
        args = [a.replace("$(PORT)", str(port)) if port else a for a in spec.args]
        return [first, *spec.command[1:], *args]

    async def _spawn(self, cmd: list[str], log: Path, env: Mapping[str, str]) -> asyncio.subprocess.Process:
        out = open(log, "ab")
        try:
            return await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                        stderr=asyncio.subprocess.STDOUT, env=dict(env),
                                                        cwd=self.plan.folder, start_new_session=True)
        finally:
            out.close()

    async def _start_listening(self, what: str, port: int, log: Path,
                               spawn: Callable[[int], Awaitable[asyncio.subprocess.Process]],
                               deadline: float, timeout: float) -> tuple[asyncio.subprocess.Process, int]:
        """Spawn a process that listens on a port we choose (`port` again if still free); raises StartFailed.

        The port is reserved until the process listens on it. A process that exits saying the port is in
        use, or finds another process listening there, is started again on a fresh port.
        """
        who = "" if what == "server" else f"{what} "  # a server's own failure reads as the server's
        for attempt in range(1, PORT_ATTEMPTS + 1):
            hold = (_reserve_port(port) if port else None) or _reserve_port()
            if hold is None:
                raise StartFailed(f"no free port for the {what}")
            port = hold.getsockname()[1]
            since = _size(log)
            taken = None
            proc = None
            try:
                proc = await spawn(port)
                while True:
                    if await _port_open(port):
                        if proc.returncode is None and _listener_is_ours(port, proc.pid):
                            return proc, port
                        if proc.returncode is None:
                            taken = "another process listens on it"
                            await _terminate(proc)
                            break
                    if proc.returncode is not None:
                        if _port_taken(log, since):
                            taken = "it was taken before the " + what + " bound it"
                            break
                        raise _failed_start(f"{who}exited with {_exit_status(proc.returncode)} before listening",
                                            log, since)
                    if time.monotonic() > deadline:
                        await _terminate(proc)
                        raise _failed_start(f"{who}did not listen on port {port} within {timeout:g}s", log, since)
                    await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if proc is not None:  # stopped while starting: nothing is left running
                    await _terminate(proc)
                raise
            finally:
                hold.close()
            if attempt < PORT_ATTEMPTS:
                self.say(f"==> {self.plan.name}: port {port} for the {what}: {taken}; trying another port")
            port = 0
        raise StartFailed(f"{what}: every port tried was taken ({PORT_ATTEMPTS} tries)")

    async def _start_bound(self, spawn: Callable[[int], Awaitable[asyncio.subprocess.Process]], port_file: Path,
                           deadline: float, timeout: float) -> tuple[asyncio.subprocess.Process, int]:
        """The sidecar, which binds its port itself and writes it to `port_file`: its last port if still free
        (a restart keeps its URL), else one the kernel picks, so no other process can take it in between."""
        log = self.sidecar_log
        for port in ([self.sidecar_port, 0] if self.sidecar_port else [0]):
            port_file.unlink(missing_ok=True)
            since = _size(log)
            proc = await spawn(port)
            try:
                while True:
                    with contextlib.suppress(OSError):
                        text = port_file.read_text().strip()
                        if text.isdigit() and proc.returncode is None:
                            return proc, int(text)
                    if proc.returncode is not None:
                        if port and _port_taken(log, since):
                            self.say(f"==> {self.plan.name}: port {port} for the sidecar was taken; it takes another")
                            break
                        raise _failed_start(f"sidecar exited with {_exit_status(proc.returncode)} before listening",
                                            log, since)
                    if time.monotonic() > deadline:
                        await _terminate(proc)
                        raise _failed_start(f"sidecar did not listen within {timeout:g}s", log, since)
                    await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                await _terminate(proc)  # stopped while starting: nothing is left running
                raise
        raise StartFailed("sidecar: no port to listen on")

    async def _start_server(self, deadline: float, timeout: float) -> None:
        """The HTTP server on `server_port` (or a fresh port)."""
        async def spawn(port: int) -> asyncio.subprocess.Process:
            return await self._spawn(self._command(port), self.server_log, self._env({"PORT": str(port)}))

        self.server, self.server_port = await self._start_listening(
            "server", self.server_port, self.server_log, spawn, deadline, timeout)

    async def _start_sidecar(self, catalogue: Any, deadline: float, timeout: float) -> None:
        """The sidecar on `sidecar_port` (or a fresh port), until the registry hears it is healthy."""
        plan = self.plan
        upstream: list[str]
        if plan.spec.transport == Transport.stdio:
            upstream = ["--upstream-command", shlex.join(self._command(None))]
        else:
            upstream = ["--upstream", f"http://127.0.0.1:{self.server_port}{plan.spec.path}"]
            if plan.spec.transport == Transport.sse:
                upstream += ["--upstream-transport", "sse"]
        # Traces go to the registry unless the user points them elsewhere: its RED figures come from them.
        user_collector = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        otlp = {} if user_collector else {"OTEL_EXPORTER_OTLP_ENDPOINT": self.registry}
        env = self._env({"TOOLMESH_REGISTRY_SECRET_FILE": str(self.secret_file), **otlp})

        port_file = self.sidecar_log.with_suffix(".port")

        async def spawn(port: int) -> asyncio.subprocess.Process:
            cmd = [*_toolmesh_command(), "sidecar", "--listen", f"127.0.0.1:{port}", "--port-file", str(port_file),
                   "--server-name", plan.name, "--registry", self.registry, "--policy", str(self.policy_file),
                   # One conversation, one budget, whichever local servers it reaches: they share this file.
                   "--state-file", str(self.run_dir / "state.db"), *upstream]
            return await self._spawn(cmd, self.sidecar_log, env)

        since = _size(self.sidecar_log)
        self.sidecar, self.sidecar_port = await self._start_bound(spawn, port_file, deadline, timeout)
        self._stdio_log_seen = _size(self.sidecar_log)
        await self._await_healthy(catalogue, deadline, timeout, since)

    async def _await_healthy(self, catalogue: Any, deadline: float, timeout: float, since: int) -> None:
        """Until a heartbeat sent from now on says the server is healthy (an earlier one may predate a crash)."""
        began = time.monotonic()  # the catalogue's clock
        proc = self.sidecar
        assert proc is not None
        while not any(i.last_seen >= began for i in catalogue.healthy_instances(self.plan.name)):
            if proc.returncode is not None:
                raise StartFailed(f"sidecar exited with {_exit_status(proc.returncode)}\n"
                                  f"{_tail(self.sidecar_log, since=since)}".rstrip())
            if time.monotonic() > deadline:
                health = [i.health for i in catalogue.instances(self.plan.name)]
                raise StartFailed(f"not healthy within {timeout:g}s ({', '.join(health) or 'no heartbeat'})\n"
                                  f"{_tail(self.sidecar_log, since=since)}".rstrip())
            await asyncio.sleep(0.05)

    async def start(self, catalogue: Any, timeout: float) -> None:
        """Start the processes and wait until the registry lists the server, or report why not."""
        plan = self.plan
        if plan.policy_error:
            self.fail(plan.policy_error)
            return
        self.write_policy()
        deadline = time.monotonic() + timeout
        try:
            if plan.spec.transport == Transport.stdio:
                if shutil.which(self._command(None)[0], path=self._env()["PATH"]) is None:
                    self.fail(f"command not found: {self._command(None)[0]}")
                    return
            else:
                await self._start_server(deadline, timeout)
            await self._start_sidecar(catalogue, deadline, timeout)
        except OSError as exc:
            await self.stop()
            self.fail(f"cannot start {self._command(None)[0]}: {exc}")
            return
        except StartFailed as exc:
            await self.stop()
            self.fail(str(exc))
            return
        self.status = "ready"

    async def supervise(self, catalogue: Any, timeout: float, restarted: Callable[[str], None]) -> None:
        """Restart the server or sidecar when it exits, with backoff; report stdio restarts done by the sidecar.

        Runs until cancelled (by `stop`). `restarted(name)` is called once the server is healthy again.
        """
        failures = 0
        up_since = time.monotonic()
        while True:
            watched = {asyncio.ensure_future(p.wait()): p for p in (self.server, self.sidecar) if p is not None}
            if not watched:
                return
            try:
                while True:
                    done, _ = await asyncio.wait(watched, timeout=1.0)
                    if done:
                        break
                    self._report_stdio_restarts()
            finally:
                for waiter in watched:
                    waiter.cancel()
            died = [p for p in (self.server, self.sidecar) if p is not None and p.returncode is not None]
            failures = 0 if time.monotonic() - up_since > STABLE_AFTER else failures + 1
            base, most = RESTART_BACKOFF
            delay = min(most, base * 2 ** max(0, failures - 1))
            self.status = "restarting"
            self.restarts += 1
            for proc in died:
                what, log = ("server", self.server_log) if proc is self.server else ("sidecar", self.sidecar_log)
                self.say(f"==> {self.plan.name}: {what} exited with {_exit_status(proc.returncode)}; "
                         f"restarting in {delay:.1f}s (restart {self.restarts})\n{_tail(log, 5)}".rstrip())
            await asyncio.sleep(delay)
            deadline = time.monotonic() + timeout
            try:
                if self.server is not None and self.server.returncode is not None:
                    port = self.server_port
                    await self._start_server(deadline, timeout)
                    if self.server_port != port and self.sidecar is not None:
                        await _terminate(self.sidecar)  # it forwards to the old port: start it again below
                if self.sidecar is not None and self.sidecar.returncode is not None:
                    await self._start_sidecar(catalogue, deadline, timeout)
                else:
                    await self._await_healthy(catalogue, deadline, timeout, _size(self.sidecar_log))
            except (OSError, StartFailed) as exc:
                # Whatever half came up goes too: the next round starts both, after a longer wait.
                self.say(f"==> {self.plan.name}: restart failed: {exc}")
                await self.stop()
                continue
            self.status = "ready"
            up_since = time.monotonic()
            restarted(self.plan.name)

    def _report_stdio_restarts(self) -> None:
        """A stdio server is restarted by its sidecar: count and say so from the sidecar's log."""
        if self.plan.spec.transport != Transport.stdio or _size(self.sidecar_log) <= self._stdio_log_seen:
            return
        from toolmesh.sidecar.telemetry import iter_lines

        with open(self.sidecar_log, "rb") as f:
            f.seek(self._stdio_log_seen)
            chunk = f.read()
        complete = chunk.rfind(b"\n") + 1
        self._stdio_log_seen += complete
        for entry in iter_lines(chunk[:complete].decode(errors="replace")):
            message = str(entry.get("message", ""))
            if message.startswith("stdio upstream exited"):
                self.say(f"==> {self.plan.name}: {message}; its sidecar restarts it")
            elif message.startswith("restarting the stdio upstream"):
                self.restarts += 1

    def fail(self, reason: str, log: Path | None = None) -> None:
        self.status = "failed"
        tail = _tail(log) if log else ""
        self.failure = reason + (f"\n{tail}" if tail else "")

    async def stop(self) -> None:
        """SIGTERM to each process group (the sidecar first: it says goodbye to the registry), then SIGKILL."""
        for proc in (self.sidecar, self.server):
            if proc is not None:
                await _terminate(proc)


# -- the whole mesh ------------------------------------------------------------------------------------


class LocalMesh:
    """The registry+gateway in this process and one LocalServer per MCPServer."""

    def __init__(self, paths: Sequence[Path], host: str, port: int, run_dir: Path, *,
                 heartbeat_interval: float, start_timeout: float, otlp_relay: str | None = None,
                 out=sys.stdout) -> None:
        self.paths = paths
        self.host, self.port = host, port
        self.run_dir = run_dir
        self.heartbeat_interval = heartbeat_interval
        self.start_timeout = start_timeout
        self.otlp_relay = otlp_relay
        self.secret = secrets.token_urlsafe(24)
        """The heartbeat secret, new each run: only the sidecars started here report, and only its holder reads the
        catalogue (`/v1/servers`, `/v1/tools`)."""
        self.servers: dict[str, LocalServer] = {}
        self._supervisors: dict[str, asyncio.Task[None]] = {}
        self.out = out
        self._app = None
        self._runner = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def secret_file(self) -> Path:
        return self.run_dir / "registry.secret"

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    async def start_registry(self) -> None:
        from aiohttp import web

        from toolmesh.registry.app import CATALOGUE, RegistrySettings, create_app
        from toolmesh.registry.auth import shared_secret

        settings = RegistrySettings(heartbeat_interval=self.heartbeat_interval, auth=shared_secret(self.secret),
                                    otlp_relay=self.otlp_relay)
        # Written where the logs go, readable by this user only: how a person reads the catalogue (`curl -H`).
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)  # a file left by an earlier run in --log-dir keeps no wider mode
            out.write(self.secret + "\n")
        self._app = create_app(settings)
        self.catalogue = self._app[CATALOGUE]
        self._runner = web.AppRunner(self._app, handler_cancellation=True, access_log=None, shutdown_timeout=2)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def apply(self, plans: Mapping[str, ServerPlan], touched: frozenset[str] = frozenset()) -> list[str]:
        """Make the running servers match `plans`; returns the names started or restarted.

        A server that failed is started again when its manifest file is in `touched`, changed or not.
        """
        from toolmesh.registry.manifests import traits_of

        changed = []
        for name in [n for n in self.servers if n not in plans]:
            self.say(f"==> {name}: removed from the manifests, stopping")
            await self._stop_server(name)
            self.catalogue.forget(name)
        starts = []
        for name, plan in plans.items():
            current = self.servers.get(name)
            if current is not None and current.plan == plan and not (
                    current.status == "failed" and str(plan.manifest) in touched):
                continue
            if current is not None and _same_processes(current.plan, plan) and current.status == "ready" \
                    and plan.policy_error is None:
                current.plan = plan
                current.write_policy()
                self.catalogue.declare(name, traits_of(plan.spec))
                self.say(f"==> {name}: policy updated ({', '.join(plan.applied) or 'none'})")
                continue
            if current is not None:
                self.say(f"==> {name}: manifest {'changed' if current.plan != plan else 'touched'}, restarting")
                await self._stop_server(name)
            self.catalogue.declare(name, traits_of(plan.spec))
            server = LocalServer(plan, self.base, self.secret_file, self.run_dir, say=self.say)
            self.servers[name] = server
            starts.append(self._start(server))
            changed.append(name)
        await asyncio.gather(*starts)
        return changed

    async def _start(self, server: LocalServer) -> None:
        await server.start(self.catalogue, self.start_timeout)
        if server.status == "ready":
            self._supervisors[server.plan.name] = asyncio.ensure_future(
                server.supervise(self.catalogue, self.start_timeout, lambda name: self.say(self.table([name]))))

    async def _stop_server(self, name: str) -> None:
        supervisor = self._supervisors.pop(name, None)
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        server = self.servers.pop(name, None)
        if server is not None:
            await server.stop()

    def table(self, names: Sequence[str] | None = None) -> str:
        view = self.catalogue.view()
        rows = [("SERVER", "TRANSPORT", "STATUS", "TOOLS", "RESTARTS", "SIDECAR", "METRICS")]
        details = []
        for name in names or sorted(self.servers):
            server = self.servers[name]
            tools = [t["name"] for t in self.catalogue.server_tools(name)]
            listening = server.sidecar_port and server.status != "failed"
            rows.append((name, server.plan.spec.transport.value, server.status, str(len(tools)), str(server.restarts),
                         server.sidecar_url if listening else "-", server.metrics_url if listening else "-"))
            if server.failure:
                details.append(f"{name} failed: {server.failure}")
            elif tools:
                details.append(f"{name}: " + ", ".join(f"{name}__{t}" for t in tools))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines += ["", *details, "",
                  f"gateway:  {self.base}/mcp   ({len(view.tools)} tools from {sum(1 for s in self.servers.values() if s.status == 'ready')} servers)",
                  f"registry: {self.base}/v1/servers  {self.base}/v1/tools  {self.base}/metrics"
                  f"   (-H \"Authorization: Bearer $(cat {self.secret_file})\")",
                  f"logs:     {self.run_dir}"]
        return "\n".join(lines)

    async def watch(self, stop: asyncio.Event) -> None:
        """Apply manifest changes until `stop` is set (polling: no extra dependency, and folders may gain files)."""
        seen = _mtimes(self.paths)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            now = _mtimes(self.paths)
            if now == seen:
                continue
            touched = frozenset(f for f, t in now.items() if seen.get(f) != t)
            seen = now
            try:
                plans, warnings = load_plan(self.paths)
            except ValueError as exc:
                self.say(f"==> manifests changed but are invalid, keeping what runs: {exc}")
                continue
            for warning in warnings:
                self.say(f"==> {warning}")
            changed = await self.apply(plans, touched)
            if changed:
                self.say(self.table(changed))

    async def close(self) -> None:
        await asyncio.gather(*(self._stop_server(name) for name in list(self.servers)))
        if self._runner is not None:
            await self._runner.cleanup()


def _same_processes(a: ServerPlan, b: ServerPlan) -> bool:
    """True when only the policy differs, which the running sidecar picks up from its file."""
    keep = {"policy"}
    return (a.name, a.folder, a.labels) == (b.name, b.folder, b.labels) and \
        a.spec.model_dump(exclude=keep) == b.spec.model_dump(exclude=keep)


def _mtimes(paths: Sequence[Path]) -> dict[str, float]:
    found = {}
    for path in paths:
        files = [*path.glob("*.yaml"), *path.glob("*.yml")] if path.is_dir() else [path]
        for file in files:
            with contextlib.suppress(OSError):
                found[str(file)] = file.stat().st_mtime_ns
    return found


async def _main(args: argparse.Namespace, plans: Mapping[str, ServerPlan], host: str, port: int, run_dir: Path) -> int:
    mesh = LocalMesh(args.paths, host, port, run_dir, heartbeat_interval=args.heartbeat_interval,
                     start_timeout=args.start_timeout, otlp_relay=args.otlp_relay)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await mesh.start_registry()
    except OSError as exc:
        print(f"toolmesh up: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    try:
        mesh.say(f"==> registry and gateway on {mesh.base}; starting {len(plans)} server(s)")
        starting = asyncio.ensure_future(mesh.apply(plans))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            mesh.say(mesh.table())
            mesh.say("==> running; Ctrl-C stops everything")
            await mesh.watch(stop)
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        stopped.cancel()
    finally:
        mesh.say("==> stopping")
        await mesh.close()
        mesh.say("==> stopped")
    return 0


def run(args: argparse.Namespace) -> int:
    from toolmesh.cli import UsageError
    from toolmesh.registry.command import parse_listen

    host, port = parse_listen(args.listen)
    if args.heartbeat_interval <= 0 or args.start_timeout <= 0:
        raise UsageError("--heartbeat-interval and --start-timeout must be positive")
    try:
        plans, warnings = load_plan(args.paths)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for warning in warnings:
        print(f"toolmesh up: {warning}", file=sys.stderr)
    if not plans:
        raise UsageError("no MCPServer in " + ", ".join(map(str, args.paths)))
    run_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="toolmesh-up-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_main(args, plans, host, port, run_dir))
