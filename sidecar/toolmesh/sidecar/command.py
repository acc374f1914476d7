"""`toolmesh sidecar`: parse the flags, pick the upstream transport, load the policy, serve on uvloop."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import shlex
import signal
import socket
import sys
from pathlib import Path
from typing import Any, TYPE_CHECKING

from toolmesh.api.errors import UsageError
from toolmesh.sidecar.settings import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, SidecarSettings

if TYPE_CHECKING:
    from toolmesh.api.policy import MCPToolPolicySpec

log = logging.getLogger("toolmesh.sidecar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--upstream", metavar="URL", help="the MCP server's URL (Streamable HTTP, or legacy SSE)")
    target.add_argument("--upstream-command", metavar='"CMD ARGS"', help="spawn this stdio MCP server and bridge it")
    target.add_argument("--upstream-fifo-dir", metavar="DIR",
                        help="attach to a stdio MCP server through in.fifo/out.fifo in DIR (Kubernetes)")
    parser.add_argument("--upstream-transport", choices=("streamable-http", "sse"), default="streamable-http",
                        help="how to speak to --upstream (default streamable-http)")
    parser.add_argument("--listen", default="127.0.0.1:7400", metavar="HOST:PORT", help="where to serve /mcp")
    parser.add_argument("--policy", metavar="FILE", help="MCPToolPolicy YAML (or its spec); re-read on change")
    parser.add_argument("--server-name", default=os.environ.get("TOOLMESH_SERVER_NAME", "mcp-server"),
                        help="the MCPServer this sidecar fronts")
    parser.add_argument("--registry", metavar="URL", default=os.environ.get("TOOLMESH_REGISTRY"),
                        help="send heartbeats to this registry")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body accepted (413 beyond; default 4 MiB)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                        help="most messages in one JSON-RPC batch (a bigger batch is refused whole; default 100)")
    parser.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                        help="browser Origin allowed to call (repeatable; default: localhost origins only; * = any)")
    parser.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long a client may take to send a request body before 408 (default 30)")
    parser.add_argument("--sse-keepalive", type=float, default=15.0, metavar="SECONDS",
                        help="keep-alive comment on a silent server stream after this long (default 15; 0 = off)")
    parser.add_argument("--sse-resume-grace", type=float, default=30.0, metavar="SECONDS",
                        help="stdio/legacy SSE upstreams: how long a call whose client lost its SSE stream keeps "
                             "running for a resume (GET + Last-Event-ID) before it is cancelled (default 30; 0 = at once)")
    parser.add_argument("--max-sessions", type=int, default=10_000, metavar="N",
                        help="stdio/legacy SSE upstreams: most client sessions at once; a new one ends the least "
                             "recently used idle session, or gets 503 when all are busy (default 10000)")
    parser.add_argument("--upstream-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how long the upstream may stay silent on a request before 504 (default 300)")
    parser.add_argument("--probe-interval", type=float, default=5.0, metavar="SECONDS",
                        help="seconds between readiness probes of the upstream (default 5)")
    parser.add_argument("--state-redis-url", metavar="URL", default=os.environ.get("TOOLMESH_STATE_REDIS_URL"),
                        help="share rate limits with every replica of this server through a Redis-protocol server "
                             "(redis://, rediss:// for TLS, unix://); the password comes from "
                             "TOOLMESH_STATE_REDIS_PASSWORD; conversation budgets and truncated results' pages are "
                             "then shared with every server of the namespace too "
                             "(default: $TOOLMESH_STATE_REDIS_URL, else in-process)")
    parser.add_argument("--state-file", type=Path, metavar="FILE", default=os.environ.get("TOOLMESH_STATE_FILE"),
                        help="without a Redis: share conversation budgets and truncated results' pages with the "
                             "other sidecars of this machine through this SQLite file (`toolmesh up` sets one; "
                             "default: $TOOLMESH_STATE_FILE, else in-process)")
    parser.add_argument("--port-file", metavar="FILE",
                        help="once listening, write the port there (with --listen HOST:0 the kernel picks a free one)")
    parser.add_argument("--log-level", default=os.environ.get("TOOLMESH_LOG_LEVEL", "INFO"),
                        help="log level of the JSON logs on stderr (default INFO)")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--listen must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def make_upstream(args: argparse.Namespace) -> Any:
    """The `Upstream` the flags ask for."""
    if args.max_sessions <= 0:
        raise UsageError("--max-sessions must be positive")
    bridged = {"timeout": args.upstream_timeout, "resume_grace": args.sse_resume_grace,
               "max_sessions": args.max_sessions}
    if args.upstream_command:
        command = shlex.split(args.upstream_command)
        if not command:
            raise UsageError("--upstream-command is empty")
        from toolmesh.sidecar.transports.stdio import StdioUpstream  # each transport is imported only when asked for

        return StdioUpstream(command, **bridged)
    if args.upstream_fifo_dir:
        from toolmesh.sidecar.transports.stdio import StdioUpstream

        return StdioUpstream.attach(args.upstream_fifo_dir, **bridged)
    url = args.upstream
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--upstream must be an http(s) URL, got {url!r}")
    if args.upstream_transport == "sse":
        from toolmesh.sidecar.transports.legacy_sse import LegacySseUpstream

        return LegacySseUpstream(url, **bridged)
    from toolmesh.sidecar.transports.http import HttpUpstream

    return HttpUpstream(url, timeout=args.upstream_timeout)


def load_policy(path: str | None) -> tuple[MCPToolPolicySpec | None, Any]:
    """(initial policy, policy source module) for `--policy`; (None, None) without it."""
    if not path:
        return None, None
    from toolmesh.sidecar.control import policy_source as source

    try:
        return source.load_policy(path), source
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reason the file is unusable is a config error at start-up
        raise UsageError(f"cannot load policy {path}: {exc}") from None


def replay_is_safe(policy: MCPToolPolicySpec | None) -> bool:
    """Whether a bridged stream's logged answers may be replayed to a resuming client under `policy`: not when it
    authenticates callers, filters what they see, or budgets results (the log holds answers before the chain)."""
    return policy is None or not (policy.auth or policy.authorization or policy.budget)


def make_stores(args: argparse.Namespace):
    """(the store replicas share, the store conversations live in): Redis for both with `--state-redis-url`; else
    the process for the first and, with `--state-file`, that file for the second. None means this process."""
    url = args.state_redis_url
    if url:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise UsageError(f"--state-redis-url must be redis://, rediss:// or unix://, not {url.split('://')[0]!r}")
        from toolmesh.sidecar.store.redis_store import RedisStore

        # Buckets and quotas name the server (and its namespace in a cluster): its replicas share them, other
        # servers never; conversations name only the namespace.
        namespace = os.environ.get("TOOLMESH_NAMESPACE") or os.environ.get("POD_NAMESPACE") or "local"
        store = RedisStore(url, namespace, args.server_name,
                           password=os.environ.get("TOOLMESH_STATE_REDIS_PASSWORD") or None)
        return store, store
    if args.state_file:
        from toolmesh.sidecar.store.base import StoreUnavailable
        from toolmesh.sidecar.store.sqlite_store import SqliteStore

        try:
            return None, SqliteStore(Path(args.state_file))
        except StoreUnavailable as exc:
            raise UsageError(f"--state-file: {exc}") from None
    return None, None


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: with port 0 the kernel picks a free port, so nothing can take it first,
    and heartbeats announce the port actually bound."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def build_app(args: argparse.Namespace):
    """(app, host, bound socket) for the parsed flags; UsageError for bad ones."""
    from toolmesh.sidecar.front.app import READINESS, SHARED, create_app

    host, port = parse_listen(args.listen)
    if args.max_body_bytes <= 0:
        raise UsageError("--max-body-bytes must be positive")
    if args.max_batch <= 0:
        raise UsageError("--max-batch must be positive")
    if args.upstream_timeout <= 0 or args.probe_interval <= 0 or args.body_timeout <= 0:
        raise UsageError("--upstream-timeout, --probe-interval and --body-timeout must be positive")
    transport = "stdio" if (args.upstream_command or args.upstream_fifo_dir) else args.upstream_transport
    settings = SidecarSettings(
        server_name=args.server_name, max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout,
        max_batch=args.max_batch,
        sse_keepalive=max(0.0, args.sse_keepalive),
        allowed_origins=tuple(args.allowed_origin), upstream_timeout=args.upstream_timeout,
        probe_interval=args.probe_interval, ready_window=max(3 * args.probe_interval, args.probe_interval + 5.0),
        transport=transport, registry=args.registry or None,
    )
    sock = bind_listener(host, port)
    port = sock.getsockname()[1]
    upstream = make_upstream(args)
    policy, source = load_policy(args.policy)
    store, conversations = make_stores(args)
    app = create_app(settings, upstream, policy=policy, store=store, conversations=conversations)
    from toolmesh.sidecar.front.app import PIPELINE

    if hasattr(upstream, "resumable"):
        # Bridged streams replay answers as the server sent them: only while the policy changes none of them.
        def follow(policy: MCPToolPolicySpec | None) -> None:
            upstream.resumable = replay_is_safe(policy)

        follow(policy)
        app[PIPELINE].on_swap(follow)
    if source is not None:
        source.attach(app, args.policy, app[PIPELINE])
    if args.registry:
        from toolmesh.sidecar.control import heartbeat

        endpoint = f"http://{host}:{port}/mcp"
        hb_settings = heartbeat.HeartbeatSettings.from_env(args.registry, args.server_name, endpoint)
        readiness = app[READINESS]
        pipeline = app[PIPELINE]
        heartbeat.attach(app, hb_settings, app[SHARED], ready=lambda: readiness.ready, policy=lambda: pipeline.policy)
    return app, host, sock


def run(args: argparse.Namespace) -> int:
    from toolmesh.sidecar.telemetry import setup_logging

    setup_logging(args.log_level)
    try:
        app, host, sock = build_app(args)
    except UsageError as exc:
        # Components never import the CLI: report the bad configuration here, with the CLI's exit code.
        print(f"toolmesh sidecar: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - non-Linux development machines
        uvloop = None
    runner = uvloop.run if uvloop is not None else asyncio.run
    return runner(_serve(app, host, sock, args.port_file))


async def _serve(app: Any, host: str, sock: socket.socket, port_file: str | None = None) -> int:
    from aiohttp import web

    # handler_cancellation: a client that hangs up cancels its handler, which releases the upstream request.
    # shutdown_timeout: open server streams (GET) never finish by themselves; give calls in flight a
    # few seconds, well inside a pod's termination grace period, then close.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    port = sock.getsockname()[1]
    site = web.SockSite(runner, sock, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(f"toolmesh sidecar: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    if port_file:
        # Written whole or not at all: whoever waits for the file never reads half a number.
        partial = f"{port_file}.{os.getpid()}.tmp"
        with open(partial, "w") as out:
            out.write(f"{port}\n")
        os.replace(partial, port_file)
    # Everything alive now (modules, the app) lives as long as the process: keep the cyclic
    # collector from re-scanning it on every full collection, which shows up as tail latency.
    gc.freeze()
    log.info("serving MCP on http://%s:%d/mcp", host, port, extra={"event": "listening", "host": host, "port": port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping", extra={"event": "stopping"})
        await runner.cleanup()
    return 0
