"""Retries of tool calls that failed in transit: exponential, linear or immediate delays with jitter and Retry-After.

Only transient failures are repeated (transport errors, 502/503/504, timeouts,
JSON-RPC internal errors) and only for tools that can safely run twice —
idempotent or read-only by annotation or policy — unless the policy forces it.
A wait is reported to the client as progress when it asked for progress.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from toolmesh.api.policy import Jitter, MCPToolPolicySpec, RetryPolicy, RetryStrategy, match_tool_rule
from toolmesh.sidecar.telemetry import stage_metrics
from toolmesh.sidecar.chain.frame import CallContext, Handler, Outcome, SseEvent
from toolmesh.sidecar.errors import ProxyError, dumps
from toolmesh.sidecar.chain.failures import (
    is_transient_error,
    is_transient_outcome,
    raise_if_unreadable,
    retry_after_seconds,
)
from toolmesh.sidecar.chain.stages.timeout import excuse_wait
from toolmesh.sidecar.chain.state import SharedState, ToolCatalog
from toolmesh.sidecar.chain.tool_traits import ensure_listed, tool_traits

NAME = "retry"
log = logging.getLogger("toolmesh.sidecar.retry")


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """How one tool is retried."""

    max_attempts: int
    strategy: RetryStrategy
    base_delay: float
    """Seconds."""
    max_delay: float
    """Seconds; also the longest upstream Retry-After that is waited for."""
    jitter: Jitter

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `retry` (0 for the first retry)."""
        if self.strategy is RetryStrategy.exponential:
            delay = self.base_delay * (2 ** retry)
        elif self.strategy is RetryStrategy.linear:
            delay = self.base_delay * (retry + 1)
        else:
            delay = 0.0
        delay = min(delay, self.max_delay)
        if self.jitter is Jitter.equal:
            delay *= 0.5 + rand()
        elif self.jitter is Jitter.full:
            delay *= rand()
        return min(delay, self.max_delay)


def schedule_for(policy: RetryPolicy, tool: str) -> tuple[RetrySchedule, bool]:
    """The schedule for `tool` and whether retrying is forced, with the first matching rule's fields over the section's."""
    rule = match_tool_rule(policy.tools, tool)

    def pick(name: str) -> Any:
        value = getattr(rule, name) if rule is not None else None
        return getattr(policy, name) if value is None else value

    schedule = RetrySchedule(max_attempts=pick("maxAttempts"), strategy=RetryStrategy(pick("strategy")),
                             base_delay=pick("baseDelayMs") / 1000, max_delay=pick("maxDelayMs") / 1000,
                             jitter=Jitter(pick("jitter")))
    return schedule, bool(pick("force"))


class RetryStage:
    """Repeats a failed tools/call by its schedule while the failure is transient and the tool allows it."""

    def __init__(self, policy: RetryPolicy, catalog: ToolCatalog, *, spec: MCPToolPolicySpec | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, rand: Callable[[], float] = random.random,
                 shared: SharedState | None = None):
        self.policy = policy
        self.catalog = catalog
        self.shared = shared
        self.spec = spec
        self.sleep = sleep
        self.rand = rand
        self.retries = 0
        """Retries made (for stats)."""
        self.retries_total = stage_metrics.counter(
            shared, "toolmesh_retries_total", "Tool calls repeated after a transient upstream failure.", ("tool",))
        self._memo: dict[str, RetrySchedule | None] = {}
        self._memo_version = -1

    def schedule(self, tool: str) -> RetrySchedule | None:
        """The tool's schedule, or None when it must not be retried."""
        if self.catalog.stale and self.shared is not None:
            ensure_listed(self.shared)
        if self._memo_version != self.catalog.version or len(self._memo) > 4096:
            self._memo.clear()
            self._memo_version = self.catalog.version
        try:
            return self._memo[tool]
        except KeyError:
            pass
        schedule, forced = schedule_for(self.policy, tool)
        traits = tool_traits(self.catalog, self.spec, tool)
        allowed = schedule.max_attempts > 1 and (forced or traits.idempotent or traits.read_only)
        self._memo[tool] = schedule if allowed else None
        return self._memo[tool]

    async def __call__(self, ctx: CallContext, call_next: Handler) -> Outcome:
        tool = ctx.tool
        schedule = self.schedule(tool) if tool is not None else None
        if schedule is None:
            return await call_next(ctx)
        attempt = 1
        while True:
            last = attempt >= schedule.max_attempts
            try:
                outcome = raise_if_unreadable(await call_next(ctx))
            except ProxyError as exc:
                if last or not is_transient_error(exc):
                    raise
                failure, retry_after = type(exc).__name__, None
            else:
                if last or not is_transient_outcome(outcome):
                    return outcome
                failure, retry_after = f"status {outcome.status}", retry_after_seconds(outcome)
                if retry_after is not None and retry_after > schedule.max_delay:
                    return outcome  # the upstream asks for longer than the policy lets a call wait
            delay = schedule.delay(attempt - 1, self.rand)
            if retry_after is not None:
                delay = max(delay, retry_after)
            self.retries += 1
            self.retries_total.inc(tool)
            log.info("retrying %s after %s", tool, failure,
                     extra={"event": "retry", "tool": tool, "attempt": attempt + 1, "delaySeconds": round(delay, 3)})
            await self._report(ctx, tool, attempt, schedule.max_attempts, delay, failure)
            if delay > 0:
                excuse_wait(delay)
                await self.sleep(delay)
            attempt += 1

    @staticmethod
    async def _report(ctx: CallContext, tool: str, attempt: int, attempts: int, delay: float, failure: str) -> None:
        token = ctx.progress_token
        if token is None:
            return
        params = {"progressToken": token, "progress": attempt,
                  "message": f"{tool} failed ({failure}); retry {attempt} of {attempts - 1} in {delay:.1f}s"}
        await ctx.emit(SseEvent(data=dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})))


def build(policy: MCPToolPolicySpec, shared: SharedState) -> RetryStage | None:
    """The retry stage when the policy has a `retry` section."""
    section = policy.retry
    if section is None:
        return None
    return RetryStage(section, shared.tools, spec=policy, shared=shared)
