"""The registry's own HTTP API: heartbeats in; servers, tools, gateway sessions and metrics out, all to holders of
the heartbeat credential (`RegistrySettings.auth`, read at each request: cluster mode sets it after start-up)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from toolmesh.api.sessions import ANONYMOUS
from toolmesh.registry.catalogue import Catalogue
from toolmesh.registry.gateway import Gateway
from toolmesh.registry.gateway.calls import json_response
from toolmesh.registry.settings import RegistrySettings
from toolmesh.registry.traces import RedFigures

Handler = Callable[[web.Request], Awaitable[web.Response]]


class RegistryApi:
    """`/v1/heartbeats`, `/v1/servers`, `/v1/tools`, `/v1/gateway`, `/metrics` and `/healthz`."""

    def __init__(self, settings: RegistrySettings, catalogue: Catalogue, gateway: Gateway, red: RedFigures) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.gateway = gateway
        self.red = red

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/heartbeats", self.post_heartbeat),
                web.get("/v1/servers", self._credentialed(self.get_servers)),
                web.get("/v1/tools", self._credentialed(self.get_tools)),
                web.get("/v1/gateway", self._credentialed(self.get_gateway)),
                web.get("/metrics", self._credentialed(self.get_metrics)),
                web.get("/healthz", healthz)]

    def _credentialed(self, handler: Handler) -> Handler:
        """Only for holders of the heartbeat credential: the catalogue names every endpoint and every tool."""
        async def check(request: web.Request) -> web.Response:
            verdict = await self.settings.auth(request.headers.get("Authorization"))
            if not verdict.allowed:
                return _refused(verdict.reason)
            return await handler(request)

        return check

    async def post_heartbeat(self, request: web.Request) -> web.Response:
        metrics = self.gateway.metrics
        verdict = await self.settings.auth(request.headers.get("Authorization"))
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
                self.catalogue.forget(str(beat.get("server")), str(beat.get("instance") or beat.get("endpoint")),
                                      namespace=verdict.namespace)
                metrics.heartbeat("leaving")
                return web.json_response({"ok": True})
            self.catalogue.heartbeat(beat)
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            metrics.heartbeat("invalid")
            return web.json_response({"error": str(exc)}, status=400)
        metrics.heartbeat("accepted")
        return web.json_response({"ok": True, "interval": self.settings.heartbeat_interval})

    async def get_servers(self, request: web.Request) -> web.Response:
        """Every server with its instances (endpoints, health, load)."""
        catalogue = self.catalogue
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
                    "lastHeartbeat": i.last_seen_wall, "inFlight": i.in_flight, "breakers": i.breakers,
                    "stats": i.stats,
                } for i in instances],
            })
        return json_response({"servers": servers})

    async def get_tools(self, request: web.Request) -> web.Response:
        """Every tool of the catalogue with its stats and RED figures, whoever may call it (callers see their own
        tools through the gateway's `tools/list`)."""
        catalogue, red = self.catalogue, self.red
        view = catalogue.view()
        tools = []
        for listed in view.tools:
            route = view.routes[listed["name"]]
            key = catalogue.key(route.server)
            stats = _server_stats([i.stats.get(route.tool) for i in catalogue.healthy_instances(route.server)])
            # Spans name the MCPServer, not its namespace: figures are shown only where that name is unambiguous.
            tools.append({**listed, "server": route.server, "namespace": key.namespace if key else None,
                          "tool": route.tool, "stats": stats, "red": red.figures(route.server, route.tool)})
        return json_response({"tools": tools, "version": view.version, "figures": {
            "stats": "from the sidecars' heartbeats: what each healthy instance counted since its sidecar started, "
                     "count, errors, result bytes and tokens, truncations and cache hits summed over them, latency, "
                     "result token percentiles and cache hit rate of the instance with the most calls; it outlives a "
                     "registry restart (the next heartbeat brings it back)",
            "red": f"from the OTLP traces this registry received: the last {red.window:g} s (calls, errors, p50/p95) "
                   "and totalCalls/totalErrors since this registry started; kept in memory, so empty after a "
                   "registry restart until new calls are traced, and counting only sidecars that export traces "
                   "here. While both have run since the sidecars started, stats.count equals red.totalCalls."}})

    async def get_gateway(self, request: web.Request) -> web.Response:
        """How many gateway sessions are open, and the caps."""
        sessions, settings = self.gateway.sessions, self.settings
        return json_response({"sessions": sessions.count(), "anonymousSessions": sessions.count(ANONYMOUS),
                              "maxSessions": sessions.max_sessions,
                              "maxSessionsPerCaller": sessions.max_sessions_per_caller,
                              "sessionIdleSeconds": settings.session_idle,
                              "anonymousSessionIdleSeconds": settings.anonymous_session_idle})

    async def get_metrics(self, request: web.Request) -> web.Response:
        """Prometheus text: gateway calls, sessions, heartbeats, catalogue size."""
        catalogue, gateway = self.catalogue, self.gateway
        states: Counter[str] = Counter()
        for server in catalogue.servers():
            for inst in catalogue.instances(server):
                states["expired" if inst.expired else "healthy" if inst.healthy else "unhealthy"] += 1
        text = gateway.metrics.render(servers=catalogue.servers(), sessions=gateway.sessions.count(),
                                      anonymous_sessions=gateway.sessions.count(ANONYMOUS),
                                      tools=len(catalogue.view().tools), instances=states, version=catalogue.version)
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8",
                                                         "X-Content-Type-Options": "nosniff"})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _refused(reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=401,
                             headers={"WWW-Authenticate": 'Bearer realm="toolmesh-registry"'})


SUMMED_STATS = ("count", "errors", "result_bytes_total", "result_tokens_total", "truncations", "cache_hits")
"""Per-tool heartbeat figures that are totals: a server's is the sum over its instances."""


def _server_stats(per_instance: list[Any]) -> dict[str, Any]:
    """One tool's heartbeat stats over a server's instances: totals summed, the rest (percentiles, rates) from the busiest."""
    figures = [f for f in per_instance if isinstance(f, dict)]
    if not figures:
        return {}
    busiest = max(figures, key=lambda f: f.get("count") or 0)
    summed = {k: sum(f.get(k) or 0 for f in figures) for k in SUMMED_STATS if any(k in f for f in figures)}
    return {**busiest, **summed, "instances": len(figures)}
