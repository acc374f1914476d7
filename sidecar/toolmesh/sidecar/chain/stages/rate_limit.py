"""Rate-limit stage: a token bucket per subject (and per tool where the policy says), bounded in memory, 429 with Retry-After.

A limit counts calls, the requests that make a server work for the caller (`CHARGED_METHODS`). Protocol
chatter is free: `initialize`, `ping`, the `*/list` methods, subscriptions, `logging/setLevel` and every
notification — an SDK client lists tools after a call to check its output schema, and that must not cost
the caller a call. A charged method sent as a notification is charged too: the server runs it all the same.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from toolmesh.api.policy import MCPToolPolicySpec, RateLimitPolicy, match_tool_rule
from toolmesh.sidecar.telemetry import stage_metrics
from toolmesh.sidecar.chain.frame import CallContext, Handler, Outcome
from toolmesh.sidecar.errors import RetryLater
from toolmesh.sidecar.chain.state import RATE_LIMIT, SharedState

NAME = "rate_limit"
CHARGED_METHODS = frozenset({"tools/call", "resources/read", "prompts/get", "completion/complete"})
"""The methods a rate limit counts."""


class Buckets:
    """Token buckets by key, least recently used dropped beyond `max_keys`. A dropped bucket comes back full."""

    def __init__(self, max_keys: int, clock: Callable[[], float] = time.monotonic):
        self.max_keys = max_keys
        self._clock = clock
        # key → [tokens, last refill time]; a list so the hot path mutates in place.
        self._buckets: OrderedDict[Any, list[float]] = OrderedDict()
        self.evictions = 0
        """Buckets dropped to stay under `max_keys`."""

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Any, rate: float, burst: int) -> float:
        """Take one token; 0.0 when granted, else the seconds until one is available."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(burst), now]
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
                self.evictions += 1
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(float(burst), bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / rate


class RateLimitStage:
    """Charges each request to its subject's bucket; tools with a rule (or every tool, with `perTool`) get their own."""

    def __init__(self, policy: RateLimitPolicy, buckets: Buckets, shared: SharedState | None = None):
        self.policy = policy
        self.buckets = buckets
        self.limited = stage_metrics.counter(
            shared, "toolmesh_rate_limited_total", "Requests refused with 429 by the rate limit.")
        self.bucket_count = stage_metrics.gauge(shared, "toolmesh_rate_limit_buckets", "Token buckets held in memory now.")

    async def __call__(self, ctx: CallContext, call_next: Handler) -> Outcome:
        # Other kinds have no method (""); a tools/call sent as a notification still runs the tool, so it pays.
        if ctx.method not in CHARGED_METHODS:
            return await call_next(ctx)
        policy = self.policy
        caller = ctx.caller
        # Without auth every caller is "anonymous": the limit is then one shared bucket for all.
        subject = (caller.issuer, caller.subject) if caller is not None else (None, "anonymous")
        rate, burst, scope = policy.requestsPerSecond, policy.burst, ""
        tool = ctx.tool
        if tool is not None:
            rule = match_tool_rule(policy.tools, tool)
            if rule is not None:
                rate = rule.requestsPerSecond
                burst = rule.burst if rule.burst is not None else policy.burst
                scope = tool
            elif policy.perTool:
                scope = tool
        wait = self.buckets.take((subject, scope), rate, burst)
        self.bucket_count.set(len(self.buckets))
        if wait > 0.0:
            self.limited.inc()
            what = f"tool {tool!r}" if scope else "this server"
            raise RetryLater(f"rate limit exceeded for {what}: retry in {wait:.3f}s", retry_after=wait)
        return await call_next(ctx)


def build(policy: MCPToolPolicySpec, shared: SharedState) -> RateLimitStage | None:
    """The stage for `policy.rateLimit`, or None without one. Buckets outlive reloads; the bound follows the policy."""
    section = policy.rateLimit
    if section is None:
        return None
    buckets = shared.kept(RATE_LIMIT, lambda: Buckets(section.maxSubjects))
    buckets.max_keys = section.maxSubjects
    return RateLimitStage(section, buckets, shared)
