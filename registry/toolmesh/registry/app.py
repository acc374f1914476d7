"""The registry's aiohttp application: heartbeats in, catalogue out, the gateway at /mcp, workflows and traces."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from toolmesh.registry.backend import BackendPool
from toolmesh.registry.catalogue import SEPARATOR, Catalogue
from toolmesh.registry.delegation import Delegation, install
from toolmesh.registry.gateway import Gateway
from toolmesh.registry.gateway.sessions import Sessions
from toolmesh.registry.http_api import RegistryApi
from toolmesh.registry.settings import RegistrySettings
from toolmesh.registry.traces import RedFigures, TraceReceiver

CATALOGUE = web.AppKey("catalogue", Catalogue)
GATEWAY = web.AppKey("gateway", Gateway)
SETTINGS = web.AppKey("settings", RegistrySettings)
DELEGATION = web.AppKey("delegation", Delegation)
TRACES = web.AppKey("traces", TraceReceiver)
API = web.AppKey("api", RegistryApi)


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
    app[DELEGATION] = Delegation(app[CATALOGUE], app[GATEWAY].sidecars)
    install(app[GATEWAY], app[DELEGATION])
    app[TRACES] = TraceReceiver(RedFigures(settings.red_window, known=_catalogued(app[CATALOGUE])),
                                settings.otlp_relay)
    app[API] = RegistryApi(settings, app[CATALOGUE], app[GATEWAY], app[TRACES].red)
    # Every part of the registry that answers HTTP brings its own routes.
    app.add_routes(app[GATEWAY].routes("/mcp"))
    app.add_routes(app[DELEGATION].routes())
    app.add_routes(app[TRACES].routes())
    app.add_routes(app[API].routes())
    app.cleanup_ctx.append(_lifetime)
    return app


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    await gateway.backends.start()
    settings = app[SETTINGS]
    expiry = asyncio.create_task(_expire_loop(app[CATALOGUE], gateway.sessions, settings.session_idle,
                                              settings.anonymous_session_idle))
    yield
    expiry.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await expiry
    gateway.close()
    await app[DELEGATION].close()
    await app[TRACES].close()
    await gateway.backends.close()


async def _expire_loop(catalogue: Catalogue, sessions: Sessions, session_idle: float, anonymous_idle: float) -> None:
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
            await sessions.expire(session_idle, anonymous_idle)


def _catalogued(catalogue: Catalogue):
    """Whether spans naming (server, tool) count: only tools the gateway serves under that name, so what anyone
    posts to /v1/traces never grows the figures beyond the catalogue."""
    def known(server: str, tool: str) -> bool:
        route = catalogue.view().routes.get(f"{server}{SEPARATOR}{tool}")
        return route is not None and route.server == server and route.tool == tool

    return known
