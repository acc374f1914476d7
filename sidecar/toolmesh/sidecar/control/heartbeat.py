"""The sidecar's heartbeats to the registry: health, tools, breaker states and per-tool stats, never in a call's way.

Every interval (the registry's reply sets it) the sidecar posts one
heartbeat. Tools come from the upstream's own `tools/list`, fetched by the
heartbeat task itself at start, whenever the catalogue is marked stale (a
`notifications/tools/list_changed`), and every few beats as a safety net. A
registry that is down only delays the next beat (exponential backoff); tool
calls never wait on any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
from aiohttp import web

from toolmesh.sidecar.chain.protected_resource import metadata_document
from toolmesh.sidecar.chain.state import CACHE, CIRCUIT_BREAKER, SharedState
from toolmesh.sidecar.transports.tools import list_tools

if TYPE_CHECKING:
    from toolmesh.api.policy import MCPToolPolicySpec

log = logging.getLogger("toolmesh.sidecar.heartbeat")

CLUSTER_TOKEN_FILE = Path("/var/run/secrets/toolmesh/token")
"""The projected ServiceAccount token (audience `toolmesh-registry`) mounted by the operator."""
RELIST_EVERY = 6
"""Beats between unconditional re-listings of the upstream's tools."""


@dataclass(slots=True)
class HeartbeatSettings:
    """Where and how the sidecar reports; `from_env` fills what flags do not."""

    registry: str
    """The registry's base URL, e.g. http://127.0.0.1:7401."""
    server: str
    """The MCPServer's name."""
    endpoint: str
    """This sidecar's MCP URL as the gateway should reach it."""
    instance: str = ""
    """Unique per sidecar; defaults to the host name and endpoint."""
    interval: float = 5.0
    """Seconds between beats until the registry says otherwise."""
    secret: str | None = None
    """Local shared secret (`TOOLMESH_REGISTRY_SECRET`)."""
    token_file: Path | None = None
    """A bearer token file re-read on every beat (projected tokens rotate)."""
    traits: dict[str, Any] = field(default_factory=dict)
    """priority / capabilities / maxConcurrent to report when the registry has no spec for the server."""

    @classmethod
    def from_env(cls, registry: str, server: str, endpoint: str, env: Mapping[str, str] = os.environ) -> HeartbeatSettings:
        token_file = env.get("TOOLMESH_REGISTRY_TOKEN_FILE")
        secret = env.get("TOOLMESH_REGISTRY_SECRET")
        if env.get("TOOLMESH_REGISTRY_SECRET_FILE"):
            secret = Path(env["TOOLMESH_REGISTRY_SECRET_FILE"]).read_text().strip()
        traits: dict[str, Any] = {}
        if env.get("TOOLMESH_SERVER_PRIORITY"):
            traits["priority"] = int(env["TOOLMESH_SERVER_PRIORITY"])
        if env.get("TOOLMESH_SERVER_CAPABILITIES"):
            traits["capabilities"] = [c.strip() for c in env["TOOLMESH_SERVER_CAPABILITIES"].split(",") if c.strip()]
        if env.get("TOOLMESH_SERVER_MAX_CONCURRENT"):
            traits["maxConcurrent"] = int(env["TOOLMESH_SERVER_MAX_CONCURRENT"])
        return cls(
            registry=registry.rstrip("/"), server=server,
            endpoint=env.get("TOOLMESH_ADVERTISE_URL") or reachable(endpoint, env),
            instance=env.get("TOOLMESH_INSTANCE") or env.get("POD_NAME") or f"{socket.gethostname()}/{endpoint}",
            interval=float(env.get("TOOLMESH_HEARTBEAT_INTERVAL") or 5.0),
            secret=secret,
            token_file=Path(token_file) if token_file else (CLUSTER_TOKEN_FILE if CLUSTER_TOKEN_FILE.exists() else None),
            traits=traits,
        )

    def authorization(self) -> str | None:
        if self.token_file is not None:
            try:
                return "Bearer " + self.token_file.read_text().strip()
            except OSError as exc:
                log.warning("cannot read registry token %s: %s", self.token_file, exc)
        return f"Bearer {self.secret}" if self.secret else None


def reachable(endpoint: str, env: Mapping[str, str] = os.environ) -> str:
    """The endpoint as others can reach it: a wildcard listen address becomes the pod's IP."""
    parts = urlsplit(endpoint)
    if parts.hostname not in ("0.0.0.0", "::", ""):
        return endpoint
    address = env.get("POD_IP")
    if not address:
        try:
            address = socket.gethostbyname(socket.gethostname())  # a pod's hostname resolves to its IP
        except OSError:
            address = "127.0.0.1"
    host = f"[{address}]" if ":" in address else address
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))


class Heartbeat:
    """The beat loop for one sidecar."""

    def __init__(self, settings: HeartbeatSettings, shared: SharedState,
                 ready: Callable[[], bool] | None = None, policy: Callable[[], MCPToolPolicySpec | None] | None = None) -> None:
        self.settings = settings
        self.shared = shared
        self._ready = ready
        self._policy = policy
        self.interval = settings.interval
        self.listing_error: str | None = "tools not listed yet"
        self._since_listing = 0

    def payload(self) -> dict[str, Any]:
        health = "ok"
        if self.listing_error:
            health = self.listing_error
        elif self._ready is not None and not self._ready():
            health = "not ready"
        beat: dict[str, Any] = {
            "server": self.settings.server,
            "instance": self.settings.instance,
            "endpoint": self.settings.endpoint,
            "health": health,
            "tools": [dict(t.definition) for t in self.shared.tools],
            "breakers": _breaker_states(self.shared),
            "stats": _tool_stats(self.shared),
        }
        policy = self._policy() if self._policy else None
        # The gateway must then ask this sidecar which tools each caller may see.
        beat["callerFiltered"] = policy is not None and policy.auth is not None
        if beat["callerFiltered"]:
            beat["auth"] = _caller_auth(policy)
        beat.update(self.settings.traits)
        return beat

    async def run(self, http: aiohttp.ClientSession) -> None:
        failures = 0
        while True:
            if self.shared.tools.stale or self._since_listing >= RELIST_EVERY:
                await self.refresh_tools()
            self._since_listing += 1
            try:
                await self.send(http, self.payload())
                failures = 0
                delay = self.interval
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                failures += 1
                # Back off while the registry is away, but never beyond the interval's reach for long.
                delay = min(self.interval * 4, 0.2 * 2 ** min(failures, 8)) * random.uniform(0.8, 1.2)
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("heartbeat to %s failed (%d in a row): %s", self.settings.registry, failures, exc)
            await asyncio.sleep(delay)

    async def send(self, http: aiohttp.ClientSession, beat: Mapping[str, Any]) -> None:
        headers = {"Content-Type": "application/json"}
        auth = self.settings.authorization()
        if auth:
            headers["Authorization"] = auth
        async with http.post(f"{self.settings.registry}/v1/heartbeats", data=orjson.dumps(beat), headers=headers,
                             timeout=aiohttp.ClientTimeout(total=max(2.0, self.interval))) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise ValueError(f"registry answered {resp.status}: {body[:200]!r}")
        reply = orjson.loads(body) if body else {}
        if isinstance(reply, dict) and isinstance(reply.get("interval"), (int, float)) and reply["interval"] > 0:
            self.interval = float(reply["interval"])

    async def leave(self, http: aiohttp.ClientSession) -> None:
        """Tell the registry this instance is going, so its tools leave now rather than after missed beats."""
        with contextlib.suppress(Exception):
            await self.send(http, {"server": self.settings.server, "instance": self.settings.instance,
                                   "endpoint": self.settings.endpoint, "leaving": True})

    async def refresh_tools(self) -> None:
        """List the upstream's tools through a short MCP session of our own."""
        upstream = self.shared.upstream
        self._since_listing = 0
        if upstream is None:
            self.listing_error = "no upstream"
            return
        try:
            tools = await list_tools(upstream)
        except Exception as exc:  # noqa: BLE001 - any failure is the upstream's health, reported, never raised
            self.listing_error = f"tools/list failed: {exc or type(exc).__name__}"
            return
        self.shared.tools.update(tools)
        self.listing_error = None


def _caller_auth(policy: MCPToolPolicySpec) -> dict[str, Any]:
    """What the gateway needs to speak OAuth for this sidecar: whether a token is required, and the authorization
    servers and scopes of its RFC 9728 metadata."""
    document = metadata_document(policy, {}) or {}
    return {"required": bool(policy.auth.required),
            "authorizationServers": list(document.get("authorization_servers") or ()),
            "scopesSupported": list(document.get("scopes_supported") or ())}


def _breaker_states(shared: SharedState) -> dict[str, Any]:
    breaker = shared.stage_state.get(CIRCUIT_BREAKER)
    states = getattr(breaker, "states", None)
    if callable(states):
        with contextlib.suppress(Exception):
            return dict(states())
    return {}


def _tool_stats(shared: SharedState) -> dict[str, Any]:
    stats = getattr(shared.telemetry, "tool_stats", None)
    result: dict[str, Any] = {}
    if callable(stats):
        with contextlib.suppress(Exception):
            result = dict(stats())
    cache = shared.stage_state.get(CACHE)
    hit_rates, hits = getattr(cache, "hit_rates", None), getattr(cache, "hits", None)
    if callable(hit_rates) and callable(hits):
        with contextlib.suppress(Exception):
            counts = hits()
            for tool, rate in hit_rates().items():
                result[tool] = {**result.get(tool, {}), "cache_hit_rate": rate, "cache_hits": counts.get(tool, 0)}
    return result


def attach(app: web.Application, settings: HeartbeatSettings, shared: SharedState,
           ready: Callable[[], bool] | None = None, policy: Callable[[], MCPToolPolicySpec | None] | None = None) -> Heartbeat:
    """Run heartbeats for the life of the sidecar's aiohttp app (a `cleanup_ctx`); returns the beat loop.
    `policy` gives the policy in force (what callers must present, reported with each heartbeat)."""
    heartbeat = Heartbeat(settings, shared, ready, policy=policy or (lambda: None))

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        http = aiohttp.ClientSession()
        task = asyncio.create_task(heartbeat.run(http), name="toolmesh-heartbeat")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await heartbeat.leave(http)
        await http.close()

    app.cleanup_ctx.append(lifetime)
    return heartbeat
