"""Result cache for read-only tools: LRU + TTL bounded by entries and bytes, per-subject keys, coalesced misses.

A result is stored once, serialised, without its JSON-RPC envelope; a hit wraps
those bytes in an envelope carrying the caller's own request id, so the hit path
does no JSON work beyond the canonical key of the arguments.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from toolmesh.api.jsonrpc import dumps
from toolmesh.api.policy import CachePolicy, MCPToolPolicySpec, match_tool_rule
from toolmesh.sidecar.telemetry import stage_metrics
from toolmesh.sidecar.chain.frame import CallContext, Handler, Outcome
from toolmesh.sidecar.chain.state import CACHE, SharedState, ToolCatalog
from toolmesh.sidecar.chain.tool_traits import ensure_listed, tool_traits

NAME = "cache"

CacheKey = tuple[str, str, bytes, str | None, str | None]
"""(server, tool, canonical arguments, subject, protocol version); subject None for results shared between callers.

The protocol version is part of the key because results differ in shape between
revisions (2026-07-28 requires `resultType`, older clients do not know it)."""


@dataclass(slots=True)
class _Entry:
    body: bytes
    expires_at: float


class ResultStore:
    """LRU of serialised results with a time to live, bounded by entry count and by bytes."""

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self.bytes = 0
        """Bytes of results held now."""
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        """Entries dropped to stay within the bounds (not counting expiries)."""
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, *keys: CacheKey) -> bytes | None:
        """The first fresh entry among `keys` (most specific first); one hit or one miss is counted."""
        now = self.clock()
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                continue
            if entry.expires_at <= now:
                self._drop(key)
                self.expirations += 1
                continue
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.body
        self.misses += 1
        return None

    def put(self, key: CacheKey, body: bytes, ttl: float) -> bool:
        """Store `body` for `ttl` seconds; False when it is larger than the whole byte bound."""
        size = len(body)
        if ttl <= 0 or size > self.max_bytes:
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(body, self.clock() + ttl)
        self.bytes += size
        self._shrink()
        return True

    def resize(self, max_entries: int, max_bytes: int) -> None:
        """Apply new bounds (a policy reload), evicting what no longer fits."""
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._shrink()

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key)
        self.bytes -= len(entry.body)

    def _shrink(self) -> None:
        while self._entries and (len(self._entries) > self.max_entries or self.bytes > self.max_bytes):
            _, entry = self._entries.popitem(last=False)
            self.bytes -= len(entry.body)
            self.evictions += 1


@dataclass(frozen=True, slots=True)
class _Decision:
    ttl: float
    shared: bool


class CacheState:
    """What survives policy reloads: the stored results and the calls in flight."""

    def __init__(self, policy: CachePolicy, clock: Callable[[], float] = time.monotonic):
        self.store = ResultStore(policy.maxEntries, policy.maxBytes, clock)
        self.in_flight: dict[CacheKey, asyncio.Future[bytes | None]] = {}
        self.coalesced = 0
        """Calls answered by another identical call's upstream round trip."""
        self.by_tool: dict[str, list[int]] = {}
        """tool → [answered from the cache, sent upstream], for the hit rate in heartbeats."""

    def count(self, tool: str, hit: bool) -> None:
        counts = self.by_tool.get(tool)
        if counts is None:
            if len(self.by_tool) >= _MEMO_LIMIT:
                return  # made-up tool names cannot grow this
            counts = self.by_tool[tool] = [0, 0]
        counts[0 if hit else 1] += 1

    def hit_rates(self) -> dict[str, float]:
        """tool → share of its cacheable calls answered without the upstream (heartbeats)."""
        return {tool: round(hits / (hits + misses), 4) for tool, (hits, misses) in self.by_tool.items()
                if hits + misses}

    def hits(self) -> dict[str, int]:
        """tool → its calls answered without the upstream (heartbeats)."""
        return {tool: hits for tool, (hits, _) in self.by_tool.items()}

    def stats(self) -> dict[str, int]:
        """Counters for /metrics and heartbeats."""
        s = self.store
        return {"hits": s.hits, "misses": s.misses, "evictions": s.evictions, "expirations": s.expirations,
                "coalesced": self.coalesced, "entries": len(s), "bytes": s.bytes}


_ENVELOPE_HEAD = b'{"jsonrpc":"2.0","id":'
_MEMO_LIMIT = 4096


def hit_outcome(request_id: Any, body: bytes) -> Outcome:
    """A stored result as the answer to the caller's own request id."""
    return Outcome(raw=b"".join((_ENVELOPE_HEAD, orjson.dumps(request_id), b',"result":', body, b"}")))


def storable_result(outcome: Outcome) -> tuple[bytes, Mapping[str, Any]] | None:
    """The serialised `result` of a successful answer and the result itself, or None for errors of any kind."""
    if outcome.status != 200:
        return None
    message = outcome.parsed()
    if type(message) is not dict and not isinstance(message, Mapping):
        return None
    result = message.get("result")
    if type(result) is not dict and not isinstance(result, Mapping):
        return None
    return dumps(result), result


class CacheMetrics:
    """The cache's series in /metrics."""

    def __init__(self, shared: SharedState | None = None):
        self.lookups = stage_metrics.counter(
            shared, "toolmesh_cache_lookups_total",
            "Cache lookups of cacheable tool calls by result (hit, miss, coalesced).", ("tool", "result"))
        self.evictions = stage_metrics.counter(
            shared, "toolmesh_cache_evictions_total", "Cached results dropped to stay within maxEntries/maxBytes.")
        self.entries = stage_metrics.gauge(shared, "toolmesh_cache_entries", "Results in the cache now.")
        self.bytes = stage_metrics.gauge(shared, "toolmesh_cache_bytes", "Bytes of results in the cache now.")


class CacheStage:
    """Answers repeated calls of read-only tools from the store; coalesces identical calls in flight."""

    def __init__(self, policy: CachePolicy, state: CacheState, catalog: ToolCatalog, *,
                 server: str = "", spec: MCPToolPolicySpec | None = None, metrics: CacheMetrics | None = None,
                 shared: SharedState | None = None):
        self.shared = shared
        self.policy = policy
        self.state = state
        self.catalog = catalog
        self.server = server
        self.spec = spec
        self.metrics = metrics or CacheMetrics()
        self._memo: dict[str, _Decision | None] = {}
        self._memo_version = -1

    def decision(self, tool: str) -> _Decision | None:
        """How `tool` is cached (ttl, shared), or None when it must not be."""
        if self.catalog.stale and self.shared is not None:
            ensure_listed(self.shared)
        if self._memo_version != self.catalog.version or len(self._memo) > _MEMO_LIMIT:
            self._memo.clear()
            self._memo_version = self.catalog.version
        try:
            return self._memo[tool]
        except KeyError:
            pass
        rule = match_tool_rule(self.policy.tools, tool)
        ttl = rule.ttlSeconds if rule is not None and rule.ttlSeconds is not None else self.policy.ttlSeconds
        traits = tool_traits(self.catalog, self.spec, tool)
        read_only = rule.readOnly if rule is not None and rule.readOnly is not None else traits.read_only
        cacheable = self.policy.enabled and ttl > 0 and read_only and not traits.explicitly_destructive
        decision = _Decision(ttl=ttl, shared=bool(rule and rule.shared)) if cacheable else None
        self._memo[tool] = decision
        return decision

    async def __call__(self, ctx: CallContext, call_next: Handler) -> Outcome:
        tool = ctx.tool
        if tool is None:
            return await call_next(ctx)
        decision = self.decision(tool)
        if decision is None:
            return await call_next(ctx)
        arguments = ctx.params.get("arguments") or {}
        try:
            canonical = dumps(arguments, sort_keys=True)
        except TypeError:
            return await call_next(ctx)
        caller = ctx.caller
        # The issuer is part of who a subject is: "alice" of two issuers are two people.
        subject = f"{caller.issuer or ''}\x00{caller.subject}" if caller is not None else ""
        version = ctx.protocol_version
        private: CacheKey = (self.server, tool, canonical, subject, version)
        shared: CacheKey = (self.server, tool, canonical, None, version)
        state = self.state
        body = state.store.lookup(shared) if decision.shared else state.store.lookup(private, shared)
        if body is not None:
            self.metrics.lookups.inc(tool, "hit")
            state.count(tool, True)
            return hit_outcome(ctx.request_id, body)

        flight_key = shared if decision.shared else private
        leader = state.in_flight.get(flight_key)
        if leader is not None:
            body = await asyncio.shield(leader)
            if body is not None:
                state.coalesced += 1
                self.metrics.lookups.inc(tool, "coalesced")
                state.count(tool, True)
                return hit_outcome(ctx.request_id, body)
            return await call_next(ctx)

        self.metrics.lookups.inc(tool, "miss")
        state.count(tool, False)

        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        state.in_flight[flight_key] = future
        body = None
        try:
            outcome = await call_next(ctx)
            stored = storable_result(outcome)
            if stored is not None:
                body, result = stored
                self._store(decision, private, shared, body, result)
            return outcome
        finally:
            state.in_flight.pop(flight_key, None)
            # Followers get the answer, tool errors included; after a failure they call upstream themselves.
            future.set_result(body)

    def _store(self, decision: _Decision, private: CacheKey, shared: CacheKey, body: bytes,
               result: Mapping[str, Any]) -> None:
        if result.get("isError") is True:
            return
        ttl = decision.ttl
        ttl_ms = result.get("ttlMs")
        if isinstance(ttl_ms, (int, float)) and not isinstance(ttl_ms, bool):
            # The server's freshness hint can shorten the policy's time to live, never lengthen it.
            ttl = min(ttl, max(0.0, ttl_ms / 1000))
        scope = result.get("cacheScope")
        is_shared = scope == "public" or (decision.shared and scope != "private")
        store = self.state.store
        evictions = store.evictions
        if store.put(shared if is_shared else private, body, ttl):
            if store.evictions != evictions:
                self.metrics.evictions.inc(amount=store.evictions - evictions)
            self.metrics.entries.set(len(store))
            self.metrics.bytes.set(store.bytes)


def build(policy: MCPToolPolicySpec, shared: SharedState) -> CacheStage | None:
    """The cache stage when the policy has an enabled `cache` section."""
    section = policy.cache
    if section is None or not section.enabled:
        return None
    state = shared.stage_state.get(CACHE)
    if state is None:
        state = shared.stage_state[CACHE] = CacheState(section)
    else:
        state.store.resize(section.maxEntries, section.maxBytes)
    return CacheStage(section, state, shared.tools, server=shared.server_name, spec=policy,
                      metrics=CacheMetrics(shared), shared=shared)
