"""The live catalogue: which server instances are alive, what tools they offer, and the gateway's names for them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from toolmesh.registry.protected_resource import CallerAuth

log = logging.getLogger("toolmesh.registry")

SEPARATOR = "__"
"""Joins server and tool in the gateway's names: `time__get_current_time`."""
NAMESPACE_SEPARATOR = "_"
"""Joins namespace and name when one MCPServer name exists in several namespaces: `team-a_search`.

Kubernetes names and namespaces never contain it, and it is among the characters every LLM
function-calling API accepts in a tool name.
"""

STATUS_LAG = 2
"""Heartbeat intervals by which MCPServer.status may trail the heartbeat it reports (one to write, one to read)."""

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


def precedence(priority: int, server: str) -> tuple[int, str]:
    """Which of several servers wins a name or URI they share: the highest priority, then the name sorting first."""
    return -priority, server


class ServerKey(NamedTuple):
    """A server's identity in the registry: its MCPServer's namespace (None in local mode) and name."""

    namespace: str | None
    name: str


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
    """Per-tool count, errors, p50/p95, result bytes and tokens, truncations, cache hits and hit rate."""
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
    auth: CallerAuth | None = None
    """How its sidecar authenticates callers (from its heartbeat), for the gateway's own RFC 9728 metadata."""
    unreachable: str | None = None
    """Why the gateway's last try to connect to this sidecar failed (refused, reset): it is then picked only when
    no other instance can be, yet stays listed; cleared by its next heartbeat or a call that gets through."""

    @property
    def healthy(self) -> bool:
        return not self.expired and self.health == "ok"


class Catalogue:
    """Every instance by server, the gateway's tool names, and change notification.

    Servers are keyed by (namespace, name). Each has a gateway name: its
    MCPServer name, or `<namespace>_<name>` while another namespace the
    registry knows has a server of that name. Methods that read take either
    a gateway name or a `ServerKey`.

    An instance missing `missed_limit` heartbeats (of `interval` seconds) is
    unhealthy and its tools leave; a server is healthy while one instance is.
    Listeners run synchronously after each change of the healthy tool set.
    """

    def __init__(self, *, interval: float = DEFAULT_INTERVAL, missed_limit: int = DEFAULT_MISSED_LIMIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.missed_limit = missed_limit
        self._clock = clock
        self._instances: dict[ServerKey, dict[str, Instance]] = {}
        self._declared: dict[ServerKey, ServerTraits] = {}
        self._listeners: list[Callable[[], None]] = []
        self._rr: dict[ServerKey, int] = {}
        self._names: dict[ServerKey, str] = {}
        """Server → its gateway name; recomputed only when a server appears or leaves."""
        self._keys: dict[str, ServerKey] = {}
        """Gateway name → server."""
        self._clashes: frozenset[str] = frozenset()
        """MCPServer names present in several namespaces now (each clash is logged once)."""
        self.version = 0
        """Bumped whenever the healthy tool set changes."""
        self._view: GatewayView | None = None
        self._fingerprint: Any = None

    # -- servers and their traits ------------------------------------------------

    def declare(self, server: str, traits: ServerTraits, *, namespace: str | None = None) -> None:
        """Record an MCPServer's spec (from manifests or the Kubernetes API); it overrides heartbeat traits."""
        key = ServerKey(namespace, server)
        if self._declared.get(key) != traits:
            known = key in self._names
            self._declared[key] = traits
            if not known:
                self._rename()
            self._changed()

    def traits(self, server: str | ServerKey) -> ServerTraits:
        key = self._resolve(server)
        if key in self._declared:
            return self._declared[key]
        for inst in self._instances.get(key, {}).values():
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
        auth = CallerAuth.from_beat(beat.get("auth"))
        namespace = beat.get("namespace") if isinstance(beat.get("namespace"), str) else None
        instances = self._server_instances(ServerKey(namespace, server))
        inst = instances.get(str(instance_id))
        if inst is None:
            inst = instances[str(instance_id)] = Instance(server=server, instance=str(instance_id), endpoint=endpoint,
                                                          namespace=namespace)
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
        inst.unreachable = None
        inst.caller_filtered = beat.get("callerFiltered") is True or auth is not None
        inst.auth = auth
        if relevant:
            self._changed()
        return inst

    def observe_remote(self, server: str, namespace: str | None, endpoint: str, tools: Iterable[Mapping[str, Any]],
                       seen_wall: float) -> None:
        """An instance known only from MCPServer.status: alive until the heartbeat deadline after `seen_wall`."""
        # Kept even while our own sidecars beat: when they stop, the server is served from here without a gap.
        # Our own heartbeats still win while they last (see `_serving`).
        instances = self._server_instances(ServerKey(namespace, server))
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
        inst.expired = inst.last_seen < self._clock() - self.deadline(remote=inst.remote)
        if relevant:
            self._changed()

    def forget(self, server: str, instance: str | None = None, *, namespace: str | None = None) -> None:
        """Drop a server (deleted MCPServer) or one of its instances (a sidecar shutting down)."""
        key = ServerKey(namespace, server)
        if instance is None:
            self._instances.pop(key, None)
            self._declared.pop(key, None)
            self._rr.pop(key, None)
            self._rename()
        else:
            self._instances.get(key, {}).pop(instance, None)
        self._changed()

    def deadline(self, *, remote: bool = False) -> float:
        """Seconds after its last heartbeat an instance stays alive: `missed_limit` intervals, and `STATUS_LAG` more
        for one known from MCPServer.status, `remote` (its replica writes it at most once an interval, and this
        one reads it once an interval)."""
        return self.interval * (self.missed_limit + (STATUS_LAG if remote else 0))

    def expire(self) -> None:
        """Mark instances that missed the heartbeat limit; called periodically."""
        now = self._clock()
        changed = False
        for instances in self._instances.values():
            for inst in instances.values():
                if not inst.expired and inst.last_seen < now - self.deadline(remote=inst.remote):
                    inst.expired = True
                    changed = True
        if changed:
            self._changed()

    def next_expiry_in(self) -> float | None:
        """Seconds until the next live instance misses its heartbeat limit, or None when none is live."""
        ends = [i.last_seen + self.deadline(remote=i.remote) for instances in self._instances.values()
                for i in instances.values() if not i.expired]
        return min(ends) - self._clock() if ends else None

    def mark_unreachable(self, inst: Instance, reason: str | None) -> None:
        """The gateway could not connect to an instance (`reason`), or could again (None).

        Only a transport failure to the sidecar itself counts, never a call's own failure (an HTTP error relayed
        from the upstream, a JSON-RPC error, a timeout): those are the call's, for the sidecar's retry and breaker.
        Even unreachable, an instance stays listed until its heartbeat deadline; `pick` only tries it last.
        """
        inst.unreachable = reason

    # -- reading -----------------------------------------------------------------

    def servers(self) -> list[str]:
        """Gateway names of every known server, sorted."""
        return sorted(self._keys)

    def keys(self) -> list[ServerKey]:
        """Every known server as (namespace, name)."""
        return list(self._names)

    def key(self, server: str) -> ServerKey | None:
        """The server a gateway name stands for."""
        return self._keys.get(server)

    def gateway_name(self, key: ServerKey) -> str | None:
        return self._names.get(key)

    def by_priority(self, servers: Iterable[str]) -> list[str]:
        """Gateway names in `precedence` order: the one that wins a shared name or URI first."""
        return sorted(servers, key=lambda s: precedence(self.traits(s).priority, s))

    def instances(self, server: str | ServerKey) -> list[Instance]:
        return list(self._instances.get(self._resolve(server), {}).values())

    def healthy_instances(self, server: str | ServerKey) -> list[Instance]:
        return [i for i in self._instances.get(self._resolve(server), {}).values() if i.healthy]

    def _resolve(self, server: str | ServerKey) -> ServerKey | None:
        return server if isinstance(server, ServerKey) else self._keys.get(server)

    def _server_instances(self, key: ServerKey) -> dict[str, Instance]:
        instances = self._instances.get(key)
        if instances is None:
            instances = self._instances[key] = {}
            if key not in self._names:
                self._rename()
                self._changed()  # other servers may have a new gateway name now
        return instances

    def _rename(self) -> None:
        """Give every server its gateway name: bare, or namespace-qualified while its name exists elsewhere too."""
        namespaces: dict[str, list[str | None]] = {}
        for key in sorted(set(self._instances) | set(self._declared), key=lambda k: (k.name, k.namespace or "")):
            namespaces.setdefault(key.name, []).append(key.namespace)
        names: dict[ServerKey, str] = {}
        for name, spaces in namespaces.items():
            for namespace in spaces:
                qualified = len(spaces) > 1 and namespace is not None
                names[ServerKey(namespace, name)] = f"{namespace}{NAMESPACE_SEPARATOR}{name}" if qualified else name
        clashes = frozenset(name for name, spaces in namespaces.items() if len(spaces) > 1)
        for name in sorted(clashes - self._clashes):
            log.warning("MCPServer %r exists in namespaces %s: its tools are listed as <namespace>%s%s%s<tool>",
                        name, ", ".join(str(n) for n in namespaces[name]), NAMESPACE_SEPARATOR, name, SEPARATOR)
        self._clashes = clashes
        self._names = names
        self._keys = {gateway: key for key, gateway in names.items()}

    def _serving(self, server: str | ServerKey) -> list[Instance]:
        """Healthy instances that heartbeat to us; only when there are none, those known from MCPServer.status."""
        healthy = self.healthy_instances(server)
        own = [i for i in healthy if not i.remote]
        return own or healthy

    def caller_filtered(self, server: str | ServerKey) -> Instance | None:
        """An instance to ask for a caller's view of `server`'s tools, when its listing depends on the caller."""
        serving = self._serving(server)
        filtered = [i for i in serving if i.caller_filtered]
        return max(filtered, key=lambda i: i.last_seen) if filtered else None

    def caller_auths(self) -> list[CallerAuth]:
        """How the servers the gateway serves now authenticate callers: one entry per instance that does."""
        return [i.auth for key in self._names for i in self._serving(key) if i.auth is not None]

    def server_tools(self, server: str | ServerKey) -> tuple[Mapping[str, Any], ...]:
        """The tools of a healthy server: from its most recently seen healthy instance."""
        serving = self._serving(server)
        if not serving:
            return ()
        return max(serving, key=lambda i: i.last_seen).tools

    def pick(self, server: str | ServerKey, exclude: Iterable[str] = ()) -> Instance | None:
        """A healthy instance for the next call, none of `exclude` (instance ids): those the gateway can reach
        first, then least in-flight, round robin among equals."""
        key = self._resolve(server)
        excluded = frozenset(exclude)
        healthy = [i for i in self._serving(key) if i.instance not in excluded] if key is not None else []
        healthy = [i for i in healthy if i.unreachable is None] or healthy
        if not healthy:
            return None
        least = min(i.in_flight for i in healthy)
        candidates = sorted((i for i in healthy if i.in_flight == least), key=lambda i: i.instance)
        turn = self._rr.get(key, 0)
        self._rr[key] = turn + 1
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
    """The server's gateway name."""
    tool: str
    """The tool's name at its server."""


@dataclass(frozen=True, slots=True)
class GatewayView:
    """One immutable snapshot of the composed catalogue, with `tools/list` pages pre-serialised."""

    version: int
    tools: tuple[dict[str, Any], ...]
    """Every healthy tool as the gateway lists it (`server__tool`, description prefixed `[server]`)."""
    routes: Mapping[str, Route]
    """Gateway name → server and upstream tool; includes the bare names won by priority."""
    claimants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Bare tool name → every server offering it, the one that wins it first (priority, then name)."""
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
        ranked: dict[str, tuple[str, ...]] = {}
        for name, claimants in owners.items():
            ranked[name] = tuple(server for _, server in sorted(claimants, key=lambda c: precedence(*c)))
            routes.setdefault(name, Route(ranked[name][0], name))
        return cls(version=version, tools=tuple(tools), routes=routes, claimants=ranked)

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
