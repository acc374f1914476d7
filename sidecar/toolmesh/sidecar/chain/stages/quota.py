"""Quota stage: calls and result tokens per subject per minute, hour or day; 429 naming the quota, until it resets.

A quota counts what a rate limit counts (`CHARGED_METHODS`): a call is refused when any quota it counts towards
is used up, with `Retry-After` until that quota's window resets. Calls are taken before the call runs; tokens
are checked before it (a call is refused once the tokens already received reach the quota) and added after it,
as the budget stage counted them, so the call that crosses a token quota completes. With a shared store
(`--state-redis-url`) every replica of the server counts in the same place; without one, each process counts its
own. When the shared store cannot answer, `onStoreError` decides (default deny).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

from toolmesh.api.policy import QUOTA_WINDOWS, MCPToolPolicySpec, QuotaPolicy, QuotaRule, glob_matches
from toolmesh.sidecar.chain.frame import CallContext, Handler, Outcome
from toolmesh.sidecar.chain.stages.rate_limit import CHARGED_METHODS
from toolmesh.sidecar.chain.state import QUOTAS, SharedState
from toolmesh.sidecar.errors import RetryLater
from toolmesh.sidecar.store.base import SharedStore, StoreUnavailable, store_failed
from toolmesh.sidecar.store.local import LocalStore
from toolmesh.sidecar.telemetry import stage_metrics

log = logging.getLogger("toolmesh.sidecar.quota")

NAME = "quota"


class QuotaStage:
    """Counts each charged call (and the tokens of its result) against every quota that covers it."""

    def __init__(self, policy: QuotaPolicy, store: SharedStore, shared: SharedState | None = None):
        self.policy = policy
        self.store = store
        self.refused = stage_metrics.counter(
            shared, "toolmesh_quota_exceeded_total", "Calls refused with 429 because a quota was used up.", ("quota",))
        self.store_errors = stage_metrics.counter(
            shared, "toolmesh_quota_store_errors_total",
            "Calls the quotas could not count because the shared store did not answer (onStoreError decided).")

    def _rules(self, tool: str | None) -> list[QuotaRule]:
        if tool is None:
            return [rule for rule in self.policy.rules if "*" in rule.tools]
        return [rule for rule in self.policy.rules if glob_matches(rule.tools, tool)]

    async def __call__(self, ctx: CallContext, call_next: Handler) -> Outcome:
        if ctx.method not in CHARGED_METHODS:
            return await call_next(ctx)
        rules = self._rules(ctx.tool)
        if not rules:
            return await call_next(ctx)
        caller = ctx.caller
        # Without auth every caller is "anonymous": a quota is then one allowance shared by all.
        subject = (caller.issuer, caller.subject) if caller is not None else (None, "anonymous")
        try:
            tokens = await self._admit(ctx, rules, subject)
        except StoreUnavailable as exc:
            store_failed(self.policy.onStoreError, "quotas", "quotas'", exc, self.store_errors)
            return await call_next(ctx)
        outcome = await call_next(ctx)
        record = ctx.record
        if tokens and record is not None and record.result_tokens:
            try:
                for key, window in tokens:
                    await self.store.add_quota(key, window, record.result_tokens)
            except StoreUnavailable as exc:
                self.store_errors.inc()
                log.warning("quotas could not count a result's %d tokens: the shared store did not answer (%s)",
                            record.result_tokens, exc)
        return outcome

    async def _admit(self, ctx: CallContext, rules: list[QuotaRule],
                     subject: tuple[str | None, str]) -> list[tuple[Hashable, int]]:
        """Take the call from every calls quota, check every token quota; refuse (giving back what was taken) if
        any is used up. The token quotas' keys, to add the result's tokens to once it is known."""
        taken: list[tuple[Hashable, int]] = []
        tokens: list[tuple[Hashable, int]] = []
        for rule in rules:
            window = QUOTA_WINDOWS[rule.window]
            key = (rule.name, *subject, ctx.tool if rule.perTool and ctx.tool else "")
            for what, limit, amount in (("calls", rule.calls, 1), ("resultTokens", rule.resultTokens, 0)):
                if limit is None:
                    continue
                granted, reset = await self.store.take_quota((*key, what), window, limit, amount)
                if not granted:
                    for given_back, its_window in taken:
                        await self.store.add_quota(given_back, its_window, -1)
                    self.refused.inc(rule.name)
                    raise RetryLater(f"quota {rule.name!r} used up: {limit} {_unit(what)} per {rule.window}; it "
                                     f"resets in {reset:.0f}s", retry_after=reset,
                                     data={"quota": rule.name, "limit": limit, "unit": what, "window": rule.window})
                (taken if amount else tokens).append(((*key, what), window))
        return tokens


def _unit(what: str) -> str:
    return "calls" if what == "calls" else "result tokens"


def build(policy: MCPToolPolicySpec, shared: SharedState) -> QuotaStage | None:
    """The stage for `policy.quota`, or None without one. Counts outlive reloads (in the shared store, or this
    process's when there is none)."""
    section = policy.quota
    if section is None:
        return None
    store = shared.store if shared.store is not None else shared.kept(QUOTAS, LocalStore)
    return QuotaStage(section, store, shared)
