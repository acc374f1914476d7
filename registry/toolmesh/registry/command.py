"""`toolmesh registry`: run the tool registry and the gateway MCP endpoint."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:7401", metavar="HOST:PORT",
                        help="where to serve the registry API and the gateway (default 127.0.0.1:7401)")
    parser.add_argument("--registry-secret-file", type=Path, metavar="FILE",
                        help="shared secret sidecars present in heartbeats (default: $TOOLMESH_REGISTRY_SECRET)")
    parser.add_argument("--heartbeat-interval", type=float, default=5.0, metavar="SECONDS",
                        help="expected seconds between heartbeats (default 5)")
    parser.add_argument("--missed-heartbeats", type=int, default=3, metavar="N",
                        help="heartbeats an instance may miss before its tools leave (default 3)")
    parser.add_argument("--page-size", type=int, default=1000, metavar="N", help="tools per tools/list page")
    parser.add_argument("--manifests", nargs="*", type=Path, default=[], metavar="PATH",
                        help="MCPServer manifests whose priority, capabilities and maxConcurrent the registry uses")
    parser.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                        help="browser Origin allowed to call the gateway (repeatable; default localhost only; * = any)")
    parser.add_argument("--public-url", metavar="URL",
                        help="the gateway's MCP URL as agents reach it (e.g. https://tools.example.com/mcp): the "
                             "resource its OAuth metadata names and its challenges point at (default: from each "
                             "request's Host)")
    parser.add_argument("--require-token", action="store_true",
                        help="while any server behind the gateway authenticates callers, answer every MCP request "
                             "without a bearer token with 401 and the OAuth challenge (default: only the calls such "
                             "a server refuses)")
    parser.add_argument("--otlp-relay", metavar="URL", help="pass received OTLP traces on to this collector too")
    parser.add_argument("--kube", action="store_true",
                        help="cluster mode: TokenReview heartbeat auth, MCPServer specs and status through the API")
    parser.add_argument("--insecure", action="store_true",
                        help="run without a heartbeat credential: anyone who can connect may report servers (and so "
                             "receive callers' tokens) and read the catalogue; for loopback development only")
    parser.add_argument("--max-sessions", type=int, default=10_000, metavar="N",
                        help="gateway sessions in all; when full the least recently used idle one ends, else new "
                             "sessions are refused with 503 (default 10000)")
    parser.add_argument("--max-sessions-per-caller", type=int, default=100, metavar="N",
                        help="gateway sessions one credential (all anonymous callers together count as one) may hold; "
                             "beyond, initialize is refused with 429 (default 100)")
    parser.add_argument("--session-idle", type=float, default=3600.0, metavar="SECONDS",
                        help="gateway sessions unused this long end (default 3600)")
    parser.add_argument("--anonymous-session-idle", type=float, default=300.0, metavar="SECONDS",
                        help="gateway sessions opened without a credential end after this long unused (default 300)")


def parse_listen(value: str) -> tuple[str, int]:
    from toolmesh.api.errors import UsageError

    host, _, port = value.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise UsageError(f"--listen must be HOST:PORT, got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    from toolmesh.api.errors import UsageError
    from toolmesh.registry.app import create_app
    from toolmesh.registry.auth import anyone, nobody, shared_secret
    from toolmesh.registry.manifests import declare_from_files
    from toolmesh.registry.settings import RegistrySettings

    host, port = parse_listen(args.listen)
    if args.heartbeat_interval <= 0 or args.missed_heartbeats < 1 or args.page_size < 1:
        raise UsageError("--heartbeat-interval, --missed-heartbeats and --page-size must be positive")
    if args.max_sessions < 1 or args.max_sessions_per_caller < 1 or args.session_idle <= 0 \
            or args.anonymous_session_idle <= 0:
        raise UsageError("--max-sessions, --max-sessions-per-caller, --session-idle and --anonymous-session-idle "
                         "must be positive")
    if args.public_url is not None:
        parts = urlsplit(args.public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise UsageError(f"--public-url must be an http(s) URL without query or fragment, got {args.public_url!r}")
    secret = os.environ.get("TOOLMESH_REGISTRY_SECRET")
    if args.registry_secret_file:
        try:
            secret = args.registry_secret_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --registry-secret-file: {exc}") from None
    if secret:
        auth = shared_secret(secret)
    elif args.insecure:
        auth = anyone
    elif args.kube:
        auth = nobody  # replaced by TokenReview below
    else:
        raise UsageError("no heartbeat credential: set $TOOLMESH_REGISTRY_SECRET or --registry-secret-file (the secret "
                         "sidecars present), or run --kube (TokenReview); --insecure accepts heartbeats from anyone")
    settings = RegistrySettings(heartbeat_interval=args.heartbeat_interval, missed_heartbeats=args.missed_heartbeats,
                                page_size=args.page_size, auth=auth, otlp_relay=args.otlp_relay,
                                allowed_origins=tuple(args.allowed_origin), session_idle=args.session_idle,
                                anonymous_session_idle=args.anonymous_session_idle, max_sessions=args.max_sessions,
                                max_sessions_per_caller=args.max_sessions_per_caller, public_url=args.public_url,
                                require_token=args.require_token)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(settings)
    if args.kube:
        from toolmesh.registry.kube import attach_kube

        try:
            attach_kube(app)
        except Exception as exc:  # noqa: BLE001 - no kubeconfig and not in a cluster: a configuration problem
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise UsageError(f"--kube: cannot reach Kubernetes (no in-cluster service account, and the kubeconfig "
                             f"cannot be used): {reason}") from None
    try:
        declare_from_files(app, args.manifests)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if auth is anyone and not args.kube:
        logging.getLogger("toolmesh.registry").warning(
            "--insecure: accepting heartbeats and catalogue reads from anyone who can connect")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - non-Linux development machines
        uvloop = None
    (uvloop.run if uvloop is not None else asyncio.run)(serve(app, host, port))
    return 0


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT, then close every stream and session."""
    # No access log: one line per gateway call costs more than the routing itself.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"toolmesh registry listening on http://{host}:{port} (gateway at /mcp)", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
