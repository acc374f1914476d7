"""The live catalogue: which server instances are alive, what tools they offer, and the gateway's names for them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

SEPARATOR = "__"
"""Joins server and tool in the gateway's names: `time__get_current_time`."""

DEFAULT_INTERVAL = 5.0
DEFAULT_MISSED_LIMIT = 3


@dataclass(frozen=True, slots=True)
class ServerTraits:
    """What an MCPServer declares about itself that the gateway and delegation use."""

    priority: int = 0
    """Higher wins the bare tool name when servers clash."""
    capabilities: tuple[str, ...] = ()
    """Capabilities offered to delegation workflows."""
    max_concurrent: int = 3
    """Delegated tasks this server runs at once."""

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> ServerTraits:
        """The traits in an MCPServer spec or a heartbeat, which spell them alike (`priority`, `maxConcurrent`...)."""
        return cls(
            priority=int(fields.get("priority") or 0),
            capabilities=tuple(str(c) for c in fields.get("capabilities") or ()),
            max_concurrent=max(1, int(fields.get("maxConcurrent") or 3)),
        )


@dataclass(slots=True)
class Instance:
    """One sidecar in front of one copy of a server, as its last heartbeat described it."""

    server: str
    """The MCPServer's name."""
    instance: str
    """Unique per sidecar (pod name, or host:port locally)."""
    endpoint: str
    """The sidecar's MCP URL, where the gateway sends calls."""
    health: str = "ok"
    """What the sidecar reports: "ok" when its upstream answers, otherwise a reason."""
    tools: tuple[Mapping[str, Any], ...] = ()
    """Tool definitions as the upstream lists them (schemas and annotations kept)."""
    breakers: Mapping[str, Any] = field(default_factory=dict)
    """Circuit breaker state per tool."""
    stats: Mapping[str, Any] = field(default_factory=dict)
    """Per-tool count, errors, p50/p95, cache hit rate."""
    traits: ServerTraits | None = None
    """Traits the heartbeat carried (used when the registry knows no MCPServer spec for it)."""
    last_seen: float = 0.0
    """Monotonic time of the last heartbeat."""
    last_seen_wall: float = 0.0
    """Wall-clock time of the last heartbeat, for people and for MCPServer.status."""
    in_flight: int = 0
    """Gateway calls and delegated tasks running on this instance now."""
    expired: bool = False
    """True once it missed the heartbeat limit (kept so /v1/servers can show it)."""
    namespace: str | None = None
    """The Kubernetes namespace of the MCPServer (cluster mode: from the sender's ServiceAccount)."""
    remote: bool = False
    """Known from MCPServer.status written by another registry replica (or before a restart), not from a heartbeat."""
    caller_filtered: bool = False
    """The sidecar authenticates callers, so which tools one may see depends on who asks."""

    @property
    def healthy(self) -> bool:
        return not self.expired and self.health == "ok"


class Catalogue:
    """Every instance by server, the gateway's tool names, and change notification.

    An instance missing `missed_limit` heartbeats (of `interval` seconds) is
    unhealthy and its tools leave; a server is healthy while one instance is.
    Listeners run synchronously after each change of the healthy tool set.
    """

    def __init__(self, *, interval: float = DEFAULT_INTERVAL, missed_limit: int = DEFAULT_MISSED_LIMIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.missed_limit = missed_limit
        self._clock = clock
        self._instances: dict[str, dict[str, Instance]] = {}
        self._declared: dict[str, ServerTraits] = {}
        self._listeners: list[Callable[[], None]] = []
        self._rr: dict[str, int] = {}
        self.version = 0
        """Bumped whenever the healthy tool set changes."""
        self._view: GatewayView | None = None
        self._fingerprint: Any = None

    # -- servers and their traits ------------------------------------------------

    def declare(self, server: str, traits: ServerTraits) -> None:
        """Record an MCPServer's spec (from manifests or the Kubernetes API); it overrides heartbeat traits."""
        if self._declared.get(server) != traits:
            self._declared[server] = traits
            self._changed()

    def traits(self, server: str) -> ServerTraits:
        if server in self._declared:
            return self._declared[server]
        for inst in self._instances.get(server, {}).values():
            if inst.traits is not None:
                return inst.traits
        return ServerTraits()

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    # -- heartbeats --------------------------------------------------------------

    def heartbeat(self, beat: Mapping[str, Any]) -> Instance:
        """Apply one heartbeat (already authenticated). Raises ValueError on a malformed one."""
        server = beat.get("server")
        endpoint = beat.get("endpoint")
        if not isinstance(server, str) or not server or SEPARATOR in server:
            raise ValueError(f"'server' must be a non-empty name without {SEPARATOR!r}")
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise ValueError("'endpoint' must be the sidecar's http(s) MCP URL")
        instance_id = beat.get("instance") or endpoint
        tools = beat.get("tools") or []
        if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
            raise ValueError("'tools' must be a list of tool definitions with names")
        traits = None
        if any(k in beat for k in ("priority", "capabilities", "maxConcurrent")):
            traits = ServerTraits.from_fields(beat)
        instances = self._instances.setdefault(server, {})
        inst = instances.get(str(instance_id))
        if inst is None:
            inst = instances[str(instance_id)] = Instance(server=server, instance=str(instance_id), endpoint=endpoint)
            relevant = True
        else:
            relevant = False
        health = str(beat.get("health") or "ok")
        tools = tuple(tools)
        # Most heartbeats repeat the last one; only a change of what the gateway shows is worth a rebuild.
        relevant = relevant or inst.expired or inst.health != health or inst.tools != tools or inst.traits != traits
        inst.endpoint = endpoint
        inst.health = health
        inst.tools = tools
        inst.breakers = beat.get("breakers") or {}
        inst.stats = beat.get("stats") or {}
        inst.traits = traits
        inst.last_seen = self._clock()
        inst.last_seen_wall = time.time()
        inst.expired = False
        inst.remote = False
        inst.caller_filtered = beat.get("callerFiltered") is True
        if isinstance(beat.get("namespace"), str):
            inst.namespace = beat["namespace"]
        if relevant:
            self._changed()
        return inst

    def observe_remote(self, server: str, namespace: str | None, endpoint: str, tools: Iterable[Mapping[str, Any]],
                       seen_wall: float) -> None:
        """An instance known only from MCPServer.status: alive until the heartbeat deadline after `seen_wall`."""
        # Kept even while our own sidecars beat: when they stop, the server is served from here without a gap.
        # Our own heartbeats still win while they last (see `_serving`).
        instances = self._instances.setdefault(server, {})
        key = f"status:{namespace}/{server}"
        inst = instances.get(key)
        tools = tuple(tools)
        if inst is None:
            inst = instances[key] = Instance(server=server, instance=key, endpoint=endpoint, remote=True,
                                             namespace=namespace)
        elif inst.last_seen_wall >= seen_wall and inst.tools == tools and inst.endpoint == endpoint:
            return
        relevant = inst.expired or inst.tools != tools or inst.health != "ok"
        inst.endpoint, inst.tools, inst.health = endpoint, tools, "ok"
        inst.last_seen_wall = seen_wall
        inst.last_seen = self._clock() - max(0.0, time.time() - seen_wall)
        inst.expired = inst.last_seen < self._clock() - self.interval * self.missed_limit
        if relevant:
            self._changed()

    def forget(self, server: str, instance: str | None = None) -> None:
        """Drop a server (deleted MCPServer) or one of its instances (a sidecar shutting down)."""
        if instance is None:
            self._instances.pop(server, None)
            self._declared.pop(server, None)
        else:
            self._instances.get(server, {}).pop(instance, None)
        self._changed()

    def expire(self) -> None:
        """Mark instances that missed the heartbeat limit; called periodically."""
        deadline = self._clock() - self.interval * self.missed_limit
        changed = False
        for instances in self._instances.values():
            for inst in instances.values():
                if not inst.expired and inst.last_seen < deadline:
                    inst.expired = True
                    changed = True
        if changed:
            self._changed()

    def next_expiry_in(self) -> float | None:
        """Seconds until the next live instance misses its heartbeat limit, or None when none is live."""
        seen = [i.last_seen for instances in self._instances.values() for i in instances.values() if not i.expired]
        return min(seen) + self.interval * self.missed_limit - self._clock() if seen else None

    def mark_failed(self, inst: Instance, reason: str) -> None:
        """The gateway could not reach an instance: treat it as unhealthy until its next heartbeat."""
        if inst.health == "ok":
            inst.health = f"unreachable: {reason}"
            self._changed()

    # -- reading -----------------------------------------------------------------

    def servers(self) -> list[str]:
        return sorted(set(self._instances) | set(self._declared))

    def instances(self, server: str) -> list[Instance]:
        return list(self._instances.get(server, {}).values())

    def healthy_instances(self, server: str) -> list[Instance]:
        return [i for i in self._instances.get(server, {}).values() if i.healthy]

    def _serving(self, server: str) -> list[Instance]:
        """Healthy instances that heartbeat to us; only when there are none, those known from MCPServer.status."""
        healthy = self.healthy_instances(server)
        own = [i for i in healthy if not i.remote]
        return own or healthy

    def caller_filtered(self, server: str) -> Instance | None:
        """An instance to ask for a caller's view of `server`'s tools, when its listing depends on the caller."""
        serving = self._serving(server)
        filtered = [i for i in serving if i.caller_filtered]
        return max(filtered, key=lambda i: i.last_seen) if filtered else None

    def server_tools(self, server: str) -> tuple[Mapping[str, Any], ...]:
        """The tools of a healthy server: from its most recently seen healthy instance."""
        serving = self._serving(server)
        if not serving:
            return ()
        return max(serving, key=lambda i: i.last_seen).tools

    def pick(self, server: str) -> Instance | None:
        """A healthy instance for the next call: least in-flight first, round robin among equals."""
        healthy = self._serving(server)
        if not healthy:
            return None
        least = min(i.in_flight for i in healthy)
        candidates = sorted((i for i in healthy if i.in_flight == least), key=lambda i: i.instance)
        turn = self._rr.get(server, 0)
        self._rr[server] = turn + 1
        return candidates[turn % len(candidates)]

    def view(self) -> GatewayView:
        """The gateway's listing and name table for the current version (built once per change)."""
        if self._view is None or self._view.version != self.version:
            self._view = GatewayView.build(self.version, {s: (self.traits(s), self.server_tools(s)) for s in self.servers()})
        return self._view

    def _changed(self) -> None:
        fingerprint = tuple(
            (s, self.traits(s), tuple(orjson.dumps(t, option=orjson.OPT_SORT_KEYS) for t in self.server_tools(s)))
            for s in self.servers()
        )
        if fingerprint == self._fingerprint:
            return
        self._fingerprint = fingerprint
        self.version += 1
        for listener in list(self._listeners):
            listener()


@dataclass(frozen=True, slots=True)
class Route:
    """Where a gateway tool name leads."""

    server: str
    tool: str


@dataclass(frozen=True, slots=True)
class GatewayView:
    """One immutable snapshot of the composed catalogue, with `tools/list` pages pre-serialised."""

    version: int
    tools: tuple[dict[str, Any], ...]
    """Every healthy tool as the gateway lists it (`server__tool`, description prefixed `[server]`)."""
    routes: Mapping[str, Route]
    """Gateway name → server and upstream tool; includes the bare names won by priority."""
    _pages: dict[tuple[int, int], bytes] = field(default_factory=dict, compare=False)
    """(start, size) → the page's tools serialised, each page built once per version."""

    @classmethod
    def build(cls, version: int, servers: Mapping[str, tuple[ServerTraits, Iterable[Mapping[str, Any]]]]) -> GatewayView:
        tools: list[dict[str, Any]] = []
        routes: dict[str, Route] = {}
        owners: dict[str, list[tuple[int, str]]] = {}
        for server in sorted(servers):
            traits, server_tools = servers[server]
            for tool in server_tools:
                name = tool["name"]
                listed = dict(tool)
                listed["name"] = f"{server}{SEPARATOR}{name}"
                description = tool.get("description") or ""
                listed["description"] = f"[{server}] {description}".rstrip()
                tools.append(listed)
                routes[listed["name"]] = Route(server, name)
                owners.setdefault(name, []).append((traits.priority, server))
        for name, claimants in owners.items():
            # Highest priority answers to the bare name; ties go to the first name alphabetically.
            _, winner = min(claimants, key=lambda c: (-c[0], c[1]))
            routes.setdefault(name, Route(winner, name))
        return cls(version=version, tools=tuple(tools), routes=routes)

    def page_json(self, cursor: str | None, size: int) -> tuple[bytes, str | None]:
        """One `tools/list` page, serialised as the inside of a JSON array (cached per page), and the next cursor.

        The cursor is the offset tied to the version, so a change of the catalogue restarts the listing.
        """
        start = self.offset(cursor)
        key = (start, size)
        body = self._pages.get(key)
        if body is None:
            body = self._pages[key] = orjson.dumps(list(self.tools[start:start + size]))[1:-1]
        end = start + size
        return body, (f"{self.version}:{end}" if end < len(self.tools) else None)

    def offset(self, cursor: str | None) -> int:
        if not cursor:
            return 0
        try:
            version, offset = cursor.split(":", 1)
            return int(offset) if int(version) == self.version else 0
        except ValueError:
            raise ValueError("invalid cursor") from None
