"""Long-lived sidecar state that outlives policy reloads: the upstream's tool metadata and each stage's own state.

Stage modules follow one convention so the chain is assembled without a
hand-kept list: `toolmesh.sidecar.chain.stages.<name>` (one per name in
`chain.STAGE_ORDER`) exposes

    def build(policy, shared: SharedState) -> Stage | None

called on start-up and on every policy reload with the new frozen policy.
It returns None when the policy does not ask for that stage. Without any
policy (no `--policy`) only `observe` is built; the policy stages are not
imported at all. Anything that must survive a reload
(rate buckets, cached results, breaker states, budgets) is kept in
`shared.stage_state`, under a typed key (`StateKey`, as aiohttp's `AppKey`) named
here, made on first build by `shared.kept(KEY, make)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from toolmesh.api.sessions import SessionBindings
    from toolmesh.sidecar.chain.stages.audit import AuditLog
    from toolmesh.sidecar.chain.stages.budget import BudgetState
    from toolmesh.sidecar.chain.stages.cache import CacheState
    from toolmesh.sidecar.chain.stages.circuit_breaker import BreakerBoard
    from toolmesh.sidecar.chain.stages.jwks import JwksKeys
    from toolmesh.sidecar.chain.tool_traits import Listing
    from toolmesh.sidecar.store.base import ConversationStore, SharedStore
    from toolmesh.sidecar.store.local import LocalStore
    from toolmesh.sidecar.transports.base import Upstream

T = TypeVar("T")


class StateKey(Generic[T]):
    """A typed slot of `SharedState.stage_state` (as aiohttp's `AppKey`): what is kept under it is a `T`."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<StateKey {self.name}>"


# Every slot of long-lived stage state, named once.
CIRCUIT_BREAKER: StateKey[BreakerBoard] = StateKey("circuit_breaker")
"""Each tool's breaker; heartbeats report their states."""
BUDGET: StateKey[BudgetState] = StateKey("budget")
"""The budget's figures, and its ledgers and stored results when kept in this process."""
CACHE: StateKey[CacheState] = StateKey("cache")
"""Cached results and their statistics; heartbeats report hit rates."""
QUOTAS: StateKey[LocalStore] = StateKey("quota")
"""Quota counts in this process (without a shared store)."""
RATE_LIMIT: StateKey[LocalStore] = StateKey("rate_limit")
"""Token buckets per subject (and tool), in this process (without a shared store)."""
JWKS: StateKey[dict[str, JwksKeys]] = StateKey("jwks")
"""Fetched signing keys per JWKS URL."""
SESSION_BINDINGS: StateKey[SessionBindings] = StateKey("session_bindings")
"""Session id → the principal that opened it."""
AUDIT_LOGS: StateKey[dict[str, AuditLog]] = StateKey("audit")
"""Open audit logs per sink, so a reload leaks no file descriptor."""
TOOL_LISTING: StateKey[Listing] = StateKey("tool_listing")
"""The sidecar's own tools/list in flight, when the catalogue is stale."""


class StageState:
    """Long-lived stage state by `StateKey`; a plain string is refused, so every slot is one named above."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[StateKey[Any], Any] = {}

    def __getitem__(self, key: StateKey[T]) -> T:
        return self._values[_checked(key)]

    def __setitem__(self, key: StateKey[T], value: T) -> None:
        self._values[_checked(key)] = value

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def get(self, key: StateKey[T]) -> T | None:
        return self._values.get(_checked(key))


def _checked(key: StateKey[T]) -> StateKey[T]:
    if not isinstance(key, StateKey):
        raise TypeError(f"stage state is kept under a StateKey, not {key!r}")
    return key


@dataclass(frozen=True, slots=True)
class ToolInfo:
    """What the upstream's `tools/list` says about one tool. Defaults follow the MCP spec for unannotated tools."""

    name: str
    """The tool's name as the upstream lists it."""
    read_only: bool = False
    """`annotations.readOnlyHint` (spec default false)."""
    destructive: bool = True
    """`annotations.destructiveHint` (spec default true)."""
    idempotent: bool = False
    """`annotations.idempotentHint` (spec default false)."""
    open_world: bool = True
    """`annotations.openWorldHint` (spec default true)."""
    definition: Mapping[str, Any] = field(default_factory=dict)
    """The tool object exactly as listed (name, description, inputSchema, annotations, ...)."""

    @classmethod
    def from_definition(cls, tool: Mapping[str, Any]) -> ToolInfo:
        ann = tool.get("annotations") or {}
        if not isinstance(ann, Mapping):
            ann = {}

        def flag(key: str, default: bool) -> bool:
            value = ann.get(key)
            return value if isinstance(value, bool) else default

        return cls(
            name=str(tool.get("name", "")),
            read_only=flag("readOnlyHint", False),
            destructive=flag("destructiveHint", True),
            idempotent=flag("idempotentHint", False),
            open_world=flag("openWorldHint", True),
            definition=tool,
        )


class ToolCatalog:
    """The upstream's tools as last listed; refreshed from every `tools/list` the sidecar sees and on `list_changed`."""

    def __init__(self) -> None:
        self._tools: dict[str, ToolInfo] = {}
        self.version = 0
        """Bumped whenever the set of tools or their metadata changes."""
        self.stale = True
        """True until the first listing, and again after `notifications/tools/list_changed`."""

    def get(self, name: str) -> ToolInfo:
        """The tool's metadata; an unknown tool gets the spec's defaults (not read-only, destructive)."""
        return self._tools.get(name) or ToolInfo(name=name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def update(self, tools: Iterable[Mapping[str, Any]], *, complete: bool = True) -> None:
        """Record listed tools. `complete` is False for a page of a paginated list (earlier pages are kept)."""
        fresh = {info.name: info for info in map(ToolInfo.from_definition, tools) if info.name}
        merged = fresh if complete else {**self._tools, **fresh}
        if merged != self._tools:
            self._tools = merged
            self.version += 1
        self.stale = False

    def mark_stale(self) -> None:
        self.stale = True


@dataclass(slots=True)
class SharedState:
    """Objects every stage may use; one per sidecar process."""

    server_name: str
    """The MCPServer's name (`--server-name`), used in cache keys, metrics and heartbeats."""
    tools: ToolCatalog = field(default_factory=ToolCatalog)
    """Tool metadata from the upstream's listings."""
    stage_state: StageState = field(default_factory=StageState)
    """Per-stage long-lived state under typed keys; survives policy reloads."""
    telemetry: Any = None
    """The telemetry object (tracer, meters, per-tool stats for heartbeats)."""
    upstream: Upstream | None = None
    """The `Upstream` in use (for stages that must call it themselves, e.g. to refresh tools/list)."""
    store: SharedStore | None = None
    """The store every replica of this server shares (`--state-redis-url`); None keeps state in this process."""
    conversations: ConversationStore | None = None
    """Where conversation ledgers and stored results live when they outlive this process: the Redis store, or a
    file the sidecars of one machine share (`--state-file`); None keeps them in this process."""

    def kept(self, key: StateKey[T], make: Callable[[], T]) -> T:
        """The long-lived state kept under `key`, made by `make` on first use; it survives policy reloads."""
        state = self.stage_state.get(key)
        if state is None:
            state = self.stage_state[key] = make()
        return state
