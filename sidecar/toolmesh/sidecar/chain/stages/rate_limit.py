"""Rate-limit stage: a token bucket per subject (and per tool where the policy says), 429 with Retry-After.

The buckets are in this process (bounded, `maxSubjects`) unless the sidecar has a shared store
(`--state-redis-url`): then every replica of the server charges the same buckets, and a subject's rate holds
whatever the number of replicas. When the shared store cannot answer, `onStoreError` decides: `allow` lets the
call through (a metric and a log line say so), `deny` refuses it with 503.

A limit counts calls, the requests that make a server work for the caller (`CHARGED_METHODS`). Protocol
chatter is free: `initialize`, `ping`, the `*/list` methods, subscriptions, `logging/setLevel` and every
notification — an SDK client lists tools after a call to check its output schema, and that must not cost
the caller a call. A charged method sent as a notification is charged too: the server runs it all the same.
"""

from __future__ import annotations

from toolmesh.api.policy import MCPToolPolicySpec, RateLimitPolicy, match_tool_rule
from toolmesh.sidecar.chain.frame import CallContext, Handler, Outcome
from toolmesh.sidecar.chain.state import RATE_LIMIT, SharedState
from toolmesh.sidecar.errors import RetryLater
from toolmesh.sidecar.store.base import SharedStore, StoreUnavailable, store_failed
from toolmesh.sidecar.store.local import LocalStore
from toolmesh.sidecar.telemetry import stage_metrics

NAME = "rate_limit"
CHARGED_METHODS = frozenset({"tools/call", "resources/read", "prompts/get", "completion/complete"})
"""The methods a rate limit counts."""


class RateLimitStage:
    """Charges each request to its subject's bucket; tools with a rule (or every tool, with `perTool`) get their own."""

    def __init__(self, policy: RateLimitPolicy, store: SharedStore, shared: SharedState | None = None):
        self.policy = policy
        self.store = store
        self.local = store if type(store) is LocalStore else None
        """The in-process store, called without a coroutine on the hot path."""
        self.limited = stage_metrics.counter(
            shared, "toolmesh_rate_limited_total", "Requests refused with 429 by the rate limit.")
        self.bucket_count = stage_metrics.gauge(shared, "toolmesh_rate_limit_buckets", "Token buckets held in memory now.")
        self.store_errors = stage_metrics.counter(
            shared, "toolmesh_rate_limit_store_errors_total",
            "Calls the rate limit could not charge because the shared store did not answer (onStoreError decided).")

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
        local = self.local
        if local is not None:
            wait = local.take((subject, scope), rate, burst)
            self.bucket_count.set(len(local))
        else:
            try:
                wait = await self.store.take_token((subject, scope), rate, burst)
            except StoreUnavailable as exc:
                store_failed(policy.onStoreError, "rate limit", "rate limit's", exc, self.store_errors)
                wait = 0.0
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
    if shared.store is not None:
        return RateLimitStage(section, shared.store, shared)
    buckets = shared.kept(RATE_LIMIT, lambda: LocalStore(section.maxSubjects))
    buckets.max_keys = section.maxSubjects
    return RateLimitStage(section, buckets, shared)
