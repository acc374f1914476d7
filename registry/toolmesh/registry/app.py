"""The registry's aiohttp application: heartbeats in, catalogue out, the gateway at /mcp, workflows and traces."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from toolmesh.api.sessions import ANONYMOUS, credential_principal
from toolmesh.registry.auth import HeartbeatAuth, nobody
from toolmesh.registry.backend import BackendPool
from toolmesh.registry.catalogue import SEPARATOR, Catalogue
from toolmesh.registry.gateway import Caller, Gateway
from toolmesh.registry.traces import RedFigures, TraceReceiver
from toolmesh.registry.delegation import Delegation, install, parse_workflow

log = logging.getLogger("toolmesh.registry")


@dataclass(slots=True)
class RegistrySettings:
    """How the registry runs; every field has a flag in `toolmesh registry`."""

    heartbeat_interval: float = 5.0
    """Seconds between a sidecar's heartbeats (the sidecar is told this in every reply)."""
    missed_heartbeats: int = 3
    """Heartbeats an instance may miss before its tools leave the catalogue."""
    page_size: int = 1000
    """Tools per `tools/list` page at the gateway."""
    auth: HeartbeatAuth = nobody
    """Checks the Authorization header of each heartbeat and catalogue read (`/v1/servers`, `/v1/tools`)."""
    otlp_relay: str | None = None
    """Base URL of a further OTLP/HTTP collector to pass received traces on to."""
    red_window: float = 300.0
    """Seconds of tool calls the RED figures cover."""
    session_idle: float = 3600.0
    """Gateway sessions unused this long (no call, no open stream) are ended."""
    anonymous_session_idle: float = 300.0
    """Gateway sessions opened without a credential are ended sooner: unused this long."""
    max_sessions: int = 10_000
    """Gateway sessions in all; when full, the least recently used idle one is ended, else `initialize` gets 503."""
    max_sessions_per_caller: int = 100
    """Gateway sessions one credential (or all anonymous callers together) may hold; beyond, `initialize` gets 429."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the gateway (default: localhost only; "*" = any)."""
    public_url: str | None = None
    """The gateway's public MCP URL, the `resource` of its RFC 9728 metadata (default: from each request's Host)."""
    require_token: bool = False
    """While a server behind the gateway authenticates callers, answer every MCP request without a token with 401."""


CATALOGUE = web.AppKey("catalogue", Catalogue)
GATEWAY = web.AppKey("gateway", Gateway)
SETTINGS = web.AppKey("settings", RegistrySettings)
DELEGATION = web.AppKey("delegation", Delegation)
TRACES = web.AppKey("traces", TraceReceiver)


def create_app(settings: RegistrySettings | None = None, catalogue: Catalogue | None = None) -> web.Application:
    settings = settings or RegistrySettings()
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[SETTINGS] = settings
    app[CATALOGUE] = catalogue or Catalogue(interval=settings.heartbeat_interval,
                                            missed_limit=settings.missed_heartbeats)
    app[GATEWAY] = Gateway(app[CATALOGUE], BackendPool(), page_size=settings.page_size,
                           allowed_origins=settings.allowed_origins, max_sessions=settings.max_sessions,
                           max_sessions_per_caller=settings.max_sessions_per_caller, public_url=settings.public_url,
                           require_token=settings.require_token)
    app.add_routes(app[GATEWAY].routes("/mcp"))
    app[DELEGATION] = Delegation(app[CATALOGUE], app[GATEWAY])
    install(app[GATEWAY], app[DELEGATION])
    app[TRACES] = TraceReceiver(RedFigures(settings.red_window, known=_catalogued(app[CATALOGUE])),
                                settings.otlp_relay)
    app.add_routes(app[TRACES].routes())
    app.router.add_post("/v1/workflows", post_workflow)
    app.router.add_get("/v1/workflows/{id}", get_workflow)
    app.cleanup_ctx.append(_lifetime)
    app.router.add_post("/v1/heartbeats", post_heartbeat)
    app.router.add_get("/v1/servers", get_servers)
    app.router.add_get("/v1/tools", get_tools)
    app.router.add_get("/v1/gateway", get_gateway)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    await gateway.backends.start()
    settings = app[SETTINGS]
    expiry = asyncio.create_task(_expire_loop(app[CATALOGUE], gateway, settings.session_idle,
                                              settings.anonymous_session_idle))
    yield
    expiry.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await expiry
    gateway.close()
    await app[DELEGATION].close()
    await app[TRACES].close()
    await gateway.backends.close()


async def _expire_loop(catalogue: Catalogue, gateway: Gateway, session_idle: float, anonymous_idle: float) -> None:
    # Wake exactly at the earliest heartbeat deadline, so an instance leaves at last beat + 3 intervals, not a poll
    # later. Heartbeats only move deadlines later, and a new instance's deadline is a whole limit away, so waking
    # at least once an interval is enough to notice instances that arrived meanwhile.
    loop = asyncio.get_running_loop()
    sweep_every = min(60.0, session_idle / 2, anonymous_idle / 2)
    next_sweep = loop.time() + sweep_every
    while True:
        wake = min(loop.time() + catalogue.interval, next_sweep)
        due = catalogue.next_expiry_in()
        if due is not None:
            wake = min(wake, loop.time() + due + 0.001)  # a millisecond past, so the deadline has passed
        await asyncio.sleep(max(0.0, wake - loop.time()))
        catalogue.expire()
        if loop.time() >= next_sweep:
            next_sweep = loop.time() + sweep_every
            await gateway.expire_sessions(session_idle, anonymous_idle)


def _catalogued(catalogue: Catalogue):
    """Whether spans naming (server, tool) count: only tools the gateway serves under that name, so what anyone
    posts to /v1/traces never grows the figures beyond the catalogue."""
    def known(server: str, tool: str) -> bool:
        route = catalogue.view().routes.get(f"{server}{SEPARATOR}{tool}")
        return route is not None and route.server == server and route.tool == tool

    return known


def _refused(reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=401,
                             headers={"WWW-Authenticate": 'Bearer realm="toolmesh-registry"'})


async def post_heartbeat(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    metrics = request.app[GATEWAY].metrics
    verdict = await settings.auth(request.headers.get("Authorization"))
    if not verdict.allowed:
        metrics.heartbeat("refused")
        return _refused(verdict.reason)
    try:
        beat = orjson.loads(await request.read())
        if not isinstance(beat, dict):
            raise ValueError("a heartbeat is a JSON object")
        if verdict.namespace is not None:
            beat["namespace"] = verdict.namespace
        if beat.get("leaving"):
            request.app[CATALOGUE].forget(str(beat.get("server")), str(beat.get("instance") or beat.get("endpoint")),
                                          namespace=verdict.namespace)
            metrics.heartbeat("leaving")
            return web.json_response({"ok": True})
        request.app[CATALOGUE].heartbeat(beat)
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        metrics.heartbeat("invalid")
        return web.json_response({"error": str(exc)}, status=400)
    metrics.heartbeat("accepted")
    return web.json_response({"ok": True, "interval": settings.heartbeat_interval})


async def get_servers(request: web.Request) -> web.Response:
    """Every server with its instances (endpoints, health, load): for those holding a heartbeat credential."""
    verdict = await request.app[SETTINGS].auth(request.headers.get("Authorization"))
    if not verdict.allowed:
        return _refused(verdict.reason)
    catalogue = request.app[CATALOGUE]
    servers = []
    for name in catalogue.servers():
        key = catalogue.key(name)
        traits = catalogue.traits(name)
        instances = catalogue.instances(name)
        servers.append({
            "name": name,
            "namespace": key.namespace if key else None,
            "mcpServer": key.name if key else name,
            "healthy": any(i.healthy for i in instances),
            "priority": traits.priority,
            "capabilities": list(traits.capabilities),
            "maxConcurrent": traits.max_concurrent,
            "tools": [t["name"] for t in catalogue.server_tools(name)],
            "instances": [{
                "instance": i.instance, "endpoint": i.endpoint, "healthy": i.healthy, "health": i.health,
                "namespace": i.namespace, "fromStatus": i.remote, "callerFiltered": i.caller_filtered,
                "unreachable": i.unreachable,
                "lastHeartbeat": i.last_seen_wall, "inFlight": i.in_flight, "breakers": i.breakers, "stats": i.stats,
            } for i in instances],
        })
    return _json({"servers": servers})


async def get_tools(request: web.Request) -> web.Response:
    """Every tool of the catalogue with its stats and RED figures, whoever may call it: for those holding a
    heartbeat credential (callers see their own tools through the gateway's `tools/list`)."""
    verdict = await request.app[SETTINGS].auth(request.headers.get("Authorization"))
    if not verdict.allowed:
        return _refused(verdict.reason)
    catalogue = request.app[CATALOGUE]
    red = request.app[TRACES].red
    view = catalogue.view()
    tools = []
    for listed in view.tools:
        route = view.routes[listed["name"]]
        key = catalogue.key(route.server)
        stats = _server_stats([i.stats.get(route.tool) for i in catalogue.healthy_instances(route.server)])
        # Spans name the MCPServer, not its namespace: figures are shown only where that name is unambiguous.
        tools.append({**listed, "server": route.server, "namespace": key.namespace if key else None,
                      "tool": route.tool, "stats": stats, "red": red.figures(route.server, route.tool)})
    return _json({"tools": tools, "version": view.version, "figures": {
        "stats": "from the sidecars' heartbeats: what each healthy instance counted since its sidecar started, count "
                 "and errors summed over them, latency and cache hit rate of the instance with the most calls; it "
                 "outlives a registry restart (the next heartbeat brings it back)",
        "red": f"from the OTLP traces this registry received: the last {red.window:g} s (calls, errors, p50/p95) "
               "and totalCalls/totalErrors since this registry started; kept in memory, so empty after a registry "
               "restart until new calls are traced, and counting only sidecars that export traces here. While both "
               "have run since the sidecars started, stats.count equals red.totalCalls."}})


def _server_stats(per_instance: list[Any]) -> dict[str, Any]:
    """One tool's heartbeat stats over a server's instances: count and errors summed, the rest from the busiest."""
    figures = [f for f in per_instance if isinstance(f, dict)]
    if not figures:
        return {}
    busiest = max(figures, key=lambda f: f.get("count") or 0)
    summed = {k: sum(f.get(k) or 0 for f in figures) for k in ("count", "errors") if any(k in f for f in figures)}
    return {**busiest, **summed, "instances": len(figures)}


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus text: gateway calls, sessions, heartbeats, catalogue size (with the heartbeat credential)."""
    verdict = await request.app[SETTINGS].auth(request.headers.get("Authorization"))
    if not verdict.allowed:
        return _refused(verdict.reason)
    catalogue, gateway = request.app[CATALOGUE], request.app[GATEWAY]
    states: Counter[str] = Counter()
    for server in catalogue.servers():
        for inst in catalogue.instances(server):
            states["expired" if inst.expired else "healthy" if inst.healthy else "unhealthy"] += 1
    text = gateway.metrics.render(servers=catalogue.servers(), sessions=gateway.session_count(),
                                  anonymous_sessions=gateway.session_count(ANONYMOUS),
                                  tools=len(catalogue.view().tools), instances=states, version=catalogue.version)
    return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8",
                                                     "X-Content-Type-Options": "nosniff"})


async def get_gateway(request: web.Request) -> web.Response:
    """How many gateway sessions are open, and the caps: for those holding a heartbeat credential."""
    settings = request.app[SETTINGS]
    verdict = await settings.auth(request.headers.get("Authorization"))
    if not verdict.allowed:
        return _refused(verdict.reason)
    gateway = request.app[GATEWAY]
    return _json({"sessions": gateway.session_count(), "anonymousSessions": gateway.session_count(ANONYMOUS),
                  "maxSessions": gateway.max_sessions, "maxSessionsPerCaller": gateway.max_sessions_per_caller,
                  "sessionIdleSeconds": settings.session_idle,
                  "anonymousSessionIdleSeconds": settings.anonymous_session_idle})


async def post_workflow(request: web.Request) -> web.Response:
    """Start a workflow with the caller's identity; `?wait=true` answers when it has finished."""
    try:
        spec = parse_workflow(orjson.loads(await request.read()))
    except orjson.JSONDecodeError as exc:
        return _json({"error": f"not JSON: {exc}"}, 400)
    except ValueError as exc:
        return _json({"error": str(exc)}, 400)
    caller = Caller(request.headers.get("Authorization"), request.headers.get("Mcp-Budget-Key"))
    run = request.app[DELEGATION].start(spec, caller)
    if request.query.get("wait") in ("1", "true", "yes"):
        await run.done.wait()
        return _json(run.as_dict())
    return _json(run.as_dict(), 202)


async def get_workflow(request: web.Request) -> web.Response:
    """A workflow's state and results, for the credential that started it; to anyone else it does not exist."""
    run = request.app[DELEGATION].runs.get(request.match_info["id"])
    principal = credential_principal(request.headers.get("Authorization"))
    if run is None or not secrets.compare_digest(run.principal, principal):
        return _json({"error": "no such workflow"}, 404)
    return _json(run.as_dict())


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
