"""The sidecar's aiohttp application: `/mcp`, health and readiness, metrics, and the lifetimes behind them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TYPE_CHECKING

from aiohttp import web

from toolmesh.sidecar.chain.pipeline import Pipeline, UpstreamCall
from toolmesh.sidecar.front.endpoint import McpEndpoint, add_routes
from toolmesh.sidecar.settings import SidecarSettings
from toolmesh.sidecar.chain.state import SharedState
from toolmesh.sidecar.telemetry import Telemetry
from toolmesh.sidecar.transports.base import Upstream

if TYPE_CHECKING:
    from toolmesh.api.policy import MCPToolPolicySpec
    from toolmesh.sidecar.store.base import ConversationStore, SharedStore

log = logging.getLogger("toolmesh.sidecar")

# Retry a failing upstream this often, so the sidecar turns ready soon after the server does.
_RETRY_WHILE_DOWN = 0.25
FAILURES_BEFORE_NOT_READY = 3
"""Consecutive failed probes that turn a ready sidecar not ready: one lost probe (a server closing its idle
keep-alive connection just as the probe arrived, say) must not drop the server's tools from the gateway."""


class Readiness:
    """Whether the upstream answered a real MCP probe recently; probed in the background."""

    def __init__(self, upstream: Upstream, telemetry: Telemetry, interval: float, window: float,
                 failures_before_not_ready: int = FAILURES_BEFORE_NOT_READY):
        self.upstream = upstream
        self.telemetry = telemetry
        self.interval = interval
        self.window = window
        self.failures_before_not_ready = failures_before_not_ready
        self.last_ok: float | None = None
        """Monotonic time of the last successful probe; None once `failures_before_not_ready` probes in a row failed."""
        self.failures = 0
        """Probes failed in a row since the last success."""
        self.last_error: str = "not probed yet"
        self.changed = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self.last_ok is not None and time.monotonic() - self.last_ok <= self.window

    async def probe_once(self) -> bool:
        was = self.ready
        try:
            ok = await self.upstream.probe()
            error = "" if ok else "upstream gave no MCP answer"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            ok, error = False, f"{exc.__class__.__name__}: {exc}"
        self.telemetry.probes.inc("ok" if ok else "failed")
        if ok:
            self.failures = 0
            self.last_ok = time.monotonic()
        else:
            self.failures += 1
            if self.failures >= self.failures_before_not_ready:
                self.last_ok = None
            else:
                log.debug("upstream probe failed", extra={"event": "probe_failed", "failures": self.failures,
                                                          "reason": error})
        self.last_error = error
        now = self.ready
        self.telemetry.upstream_up.set(1 if now else 0)
        if now != was:
            log.info("upstream %s", "ready" if now else "not ready",
                     extra={"event": "readiness", "ready": now, "reason": error or None})
            self.changed.set()
            self.changed = asyncio.Event()
        return ok

    async def run(self) -> None:
        while True:
            ok = await self.probe_once()
            # After a failure, look again soon: to turn ready quickly, or to confirm an outage quickly.
            await asyncio.sleep(self.interval if ok else min(self.interval, _RETRY_WHILE_DOWN))


PIPELINE = web.AppKey("pipeline", Pipeline)
SHARED = web.AppKey("shared", SharedState)
TELEMETRY = web.AppKey("telemetry", Telemetry)
READINESS = web.AppKey("readiness", Readiness)
SETTINGS = web.AppKey("settings", SidecarSettings)


def create_app(settings: SidecarSettings, upstream: Upstream, *, policy: MCPToolPolicySpec | None = None,
               telemetry: Telemetry | None = None, store: SharedStore | None = None,
               conversations: ConversationStore | None = None,
               lifetimes: tuple[Callable[[web.Application], AsyncIterator[None]], ...] = ()) -> web.Application:
    """The sidecar application for one upstream. `lifetimes` are extra `cleanup_ctx` entries (policy watching, heartbeats)."""
    # The body limit is enforced by the /mcp handler (to answer with a JSON-RPC error); this is a backstop.
    app = web.Application(client_max_size=settings.max_body_bytes, handler_args={"max_field_size": 16384})
    telemetry = telemetry or Telemetry(
        settings.server_name, network_transport="pipe" if settings.transport == "stdio" else "tcp",
        default_traces_endpoint=f"{settings.registry.rstrip('/')}/v1/traces" if settings.registry else None)
    shared = SharedState(server_name=settings.server_name, telemetry=telemetry, upstream=upstream, store=store,
                         conversations=conversations)
    pipeline = Pipeline(UpstreamCall(upstream, shared), shared, policy)
    readiness = Readiness(upstream, telemetry, settings.probe_interval, settings.ready_window)
    app[SETTINGS] = settings
    app[SHARED] = shared
    app[TELEMETRY] = telemetry
    app[PIPELINE] = pipeline
    app[READINESS] = readiness

    app.cleanup_ctx.append(_upstream_lifetime)
    app.cleanup_ctx.append(_readiness_lifetime)
    app.cleanup_ctx.extend(lifetimes)

    add_routes(app, McpEndpoint(pipeline, settings))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


async def _upstream_lifetime(app: web.Application) -> AsyncIterator[None]:
    upstream = app[SHARED].upstream
    await upstream.start()
    try:
        yield
    finally:
        await upstream.close()
        shared = app[SHARED]
        for store in {id(s): s for s in (shared.store, shared.conversations) if s is not None}.values():
            await store.close()
        app[TELEMETRY].shutdown()


async def _readiness_lifetime(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[READINESS].run(), name="toolmesh-readiness-probe")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    readiness = request.app[READINESS]
    pipeline = request.app[PIPELINE]
    tools = request.app[SHARED].tools
    body = {"ready": readiness.ready, "policyGeneration": pipeline.generation,
            "tools": len(tools), "toolsStale": tools.stale}
    if not readiness.ready:
        body["reason"] = readiness.last_error or "no successful probe within the readiness window"
        return web.json_response(body, status=503)
    return web.json_response(body)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[TELEMETRY].render_metrics(), content_type="text/plain",
                        headers={"X-Content-Type-Options": "nosniff"}, charset="utf-8")
