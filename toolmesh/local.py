"""`toolmesh up`: run MCPServer/MCPToolPolicy manifests as local processes behind sidecars, with the gateway.

The same files `kubectl apply` takes. Each MCPServer's `command`/`args`/`env`
run on this machine (stdio servers are spawned by their sidecar; HTTP servers
get a free port in `$PORT` and `$(PORT)` in their args), each behind its own
`toolmesh sidecar` with the merged policies that select it, all reporting to
the registry and gateway served in this process. A server that fails to
start is reported with the end of its log while the rest run; a changed
manifest is applied while running; Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
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


def load_plan(paths: Sequence[Path]) -> tuple[dict[str, ServerPlan], list[str]]:
    """Servers with their merged policies; raises ValueError on unreadable or invalid manifests."""
    from toolmesh.operator.merge import PolicySource, merge_policies
    from toolmesh.registry.manifests import documents, server_spec

    servers: list[tuple[str, MCPServerSpec, dict[str, str], Path]] = []
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
                                 None if merged.error else merged.spec, merged.error, tuple(merged.applied))
    return plans, warnings


# -- running one server --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def _toolmesh_command() -> list[str]:
    script = Path(sys.executable).with_name("toolmesh")
    return [str(script)] if script.exists() else [sys.executable, "-m", "toolmesh"]


@dataclass
class LocalServer:
    """The processes of one MCPServer: its sidecar, and for HTTP transports the server itself."""

    plan: ServerPlan
    registry: str
    secret_file: Path
    """The registry's heartbeat secret, in a file readable by this user only (never in an environment variable, which
    a stdio server spawned by the sidecar would inherit)."""
    run_dir: Path
    sidecar_port: int = 0
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    status: str = "starting"
    """starting → ready | failed: reason."""
    failure: str | None = None

    @property
    def sidecar_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar_port}/mcp"

    @property
    def policy_file(self) -> Path:
        return self.run_dir / f"{self.plan.name}.policy.yaml"

    def write_policy(self) -> None:
        """The merged policy as the sidecar reads it (re-read by the sidecar when it changes)."""
        manifest = {"apiVersion": API_VERSION, "kind": "MCPToolPolicy",
                    "metadata": {"name": f"{self.plan.name}-merged"}, "spec": dict(self.plan.policy or {})}
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
        tmp.replace(self.policy_file)  # atomic: the sidecar never reads half a file

    def _env(self, extra: Mapping[str, str] = {}) -> dict[str, str]:
        env = dict(os.environ, PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1")
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
            proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                        stderr=asyncio.subprocess.STDOUT, env=dict(env),
                                                        cwd=self.plan.folder, start_new_session=True)
        finally:
            out.close()
        self.processes.append(proc)
        return proc

    async def start(self, catalogue: Any, timeout: float) -> None:
        """Start the processes and wait until the registry lists the server, or report why not."""
        plan = self.plan
        if plan.policy_error:
            self.fail(plan.policy_error)
            return
        self.write_policy()
        name = plan.name
        server_log = self.run_dir / f"{name}.server.log"
        sidecar_log = self.run_dir / f"{name}.sidecar.log"
        self.sidecar_port = _free_port()
        sidecar = [*_toolmesh_command(), "sidecar", "--listen", f"127.0.0.1:{self.sidecar_port}",
                   "--server-name", name, "--registry", self.registry, "--policy", str(self.policy_file)]
        deadline = time.monotonic() + timeout
        try:
            if plan.spec.transport == Transport.stdio:
                if shutil.which(self._command(None)[0], path=self._env()["PATH"]) is None:
                    self.fail(f"command not found: {self._command(None)[0]}")
                    return
                sidecar += ["--upstream-command", shlex.join(self._command(None))]
            else:
                port = _free_port()
                server = await self._spawn(self._command(port), server_log, self._env({"PORT": str(port)}))
                while not await _port_open(port):
                    if server.returncode is not None:
                        self.fail(f"exited with status {server.returncode} before listening", server_log)
                        return
                    if time.monotonic() > deadline:
                        self.fail(f"did not listen on port {port} within {timeout:g}s", server_log)
                        return
                    await asyncio.sleep(0.1)
                sidecar += ["--upstream", f"http://127.0.0.1:{port}{plan.spec.path}"]
                if plan.spec.transport == Transport.sse:
                    sidecar += ["--upstream-transport", "sse"]
        except OSError as exc:
            self.fail(f"cannot start {self._command(None)[0]}: {exc}")
            return
        # Traces go to the registry unless the user points them elsewhere: its RED figures come from them.
        otlp = {} if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else {"OTEL_EXPORTER_OTLP_ENDPOINT": self.registry}
        proc = await self._spawn(sidecar, sidecar_log,
                                 self._env({"TOOLMESH_REGISTRY_SECRET_FILE": str(self.secret_file), **otlp}))
        while not catalogue.healthy_instances(name):
            if proc.returncode is not None:
                self.fail(f"sidecar exited with status {proc.returncode}", sidecar_log)
                return
            if time.monotonic() > deadline:
                health = [i.health for i in catalogue.instances(name)]
                self.fail(f"not healthy within {timeout:g}s ({', '.join(health) or 'no heartbeat'})", sidecar_log)
                return
            await asyncio.sleep(0.05)
        self.status = "ready"

    def fail(self, reason: str, log: Path | None = None) -> None:
        self.status = "failed"
        tail = _tail(log) if log else ""
        self.failure = reason + (f"\n{tail}" if tail else "")

    async def stop(self) -> None:
        """SIGTERM to each process group (the sidecar first: it says goodbye to the registry), then SIGKILL."""
        for proc in reversed(self.processes):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        self.processes.clear()


# -- the whole mesh ------------------------------------------------------------------------------------


class LocalMesh:
    """The registry+gateway in this process and one LocalServer per MCPServer."""

    def __init__(self, paths: Sequence[Path], host: str, port: int, run_dir: Path, *,
                 heartbeat_interval: float, start_timeout: float, out=sys.stdout) -> None:
        self.paths = paths
        self.host, self.port = host, port
        self.run_dir = run_dir
        self.heartbeat_interval = heartbeat_interval
        self.start_timeout = start_timeout
        self.secret = secrets.token_urlsafe(24)
        """The heartbeat secret, new each run: only the sidecars started here report, and only its holder reads the
        catalogue (`/v1/servers`, `/v1/tools`)."""
        self.servers: dict[str, LocalServer] = {}
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

        settings = RegistrySettings(heartbeat_interval=self.heartbeat_interval, auth=shared_secret(self.secret))
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

    async def apply(self, plans: Mapping[str, ServerPlan]) -> list[str]:
        """Make the running servers match `plans`; returns the names started or restarted."""
        from toolmesh.registry.manifests import traits_of

        changed = []
        for name in [n for n in self.servers if n not in plans]:
            self.say(f"==> {name}: removed from the manifests, stopping")
            await self.servers.pop(name).stop()
            self.catalogue.forget(name)
        starts = []
        for name, plan in plans.items():
            current = self.servers.get(name)
            if current is not None and current.plan == plan:
                continue
            if current is not None and _same_processes(current.plan, plan) and current.status == "ready" \
                    and plan.policy_error is None:
                current.plan = plan
                current.write_policy()
                self.catalogue.declare(name, traits_of(plan.spec))
                self.say(f"==> {name}: policy updated ({', '.join(plan.applied) or 'none'})")
                continue
            if current is not None:
                self.say(f"==> {name}: manifest changed, restarting")
                await current.stop()
            self.catalogue.declare(name, traits_of(plan.spec))
            server = LocalServer(plan, self.base, self.secret_file, self.run_dir)
            self.servers[name] = server
            starts.append(server.start(self.catalogue, self.start_timeout))
            changed.append(name)
        await asyncio.gather(*starts)
        return changed

    def table(self, names: Sequence[str] | None = None) -> str:
        view = self.catalogue.view()
        rows = [("SERVER", "TRANSPORT", "STATUS", "TOOLS", "SIDECAR")]
        details = []
        for name in names or sorted(self.servers):
            server = self.servers[name]
            tools = [t["name"] for t in self.catalogue.server_tools(name)]
            rows.append((name, server.plan.spec.transport.value, server.status, str(len(tools)),
                         server.sidecar_url if server.sidecar_port and server.status != "failed" else "-"))
            if server.failure:
                details.append(f"{name} failed: {server.failure}")
            elif tools:
                details.append(f"{name}: " + ", ".join(f"{name}__{t}" for t in tools))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines += ["", *details, "",
                  f"gateway:  {self.base}/mcp   ({len(view.tools)} tools from {sum(1 for s in self.servers.values() if s.status == 'ready')} servers)",
                  f"registry: {self.base}/v1/servers  {self.base}/v1/tools"
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
            seen = now
            try:
                plans, warnings = load_plan(self.paths)
            except ValueError as exc:
                self.say(f"==> manifests changed but are invalid, keeping what runs: {exc}")
                continue
            for warning in warnings:
                self.say(f"==> {warning}")
            changed = await self.apply(plans)
            if changed:
                self.say(self.table(changed))

    async def close(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.servers.values()))
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
                     start_timeout=args.start_timeout)
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
