"""Per-tool circuit breakers: after N consecutive upstream failures a tool is refused at once until a trial succeeds.

closed → open after `failureThreshold` consecutive transient failures → after
`openSeconds` half-open: `halfOpenMaxCalls` trial calls go through while the
others wait for their verdict (reporting progress) → closed on a success,
open again on a failure. Tool errors (`isError`) are answers, not failures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from toolmesh.api.policy import CircuitBreakerPolicy, MCPToolPolicySpec
from toolmesh.sidecar.telemetry import stage_metrics
from toolmesh.sidecar.chain.frame import CallContext, Handler, Outcome, SseEvent
from toolmesh.sidecar.errors import CIRCUIT_OPEN, ProxyError, RetryLater, dumps
from toolmesh.sidecar.chain.failures import is_transient_error, is_transient_outcome, raise_if_unreadable
from toolmesh.sidecar.chain.state import CIRCUIT_BREAKER, SharedState

NAME = "circuit_breaker"
log = logging.getLogger("toolmesh.sidecar.circuit_breaker")
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_STATE_VALUE = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}
MAX_TRACKED = 10_000
"""Most tools with a breaker in memory; a client calling made-up tool names cannot grow it beyond this."""


class CircuitOpen(RetryLater):
    """Retry after the breaker's open period: the upstream tool failed repeatedly (HTTP 503)."""

    status = 503
    code = CIRCUIT_OPEN


@dataclass(slots=True)
class Breaker:
    """One tool's breaker."""

    state: str = CLOSED
    failures: int = 0
    """Consecutive failures while closed."""
    opened_at: float = 0.0
    trials: int = 0
    """Trial calls in flight while half-open."""
    verdict: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a half-open trial ends; waiters then look at the state again."""
    opened: int = 0
    """Times this breaker opened (for stats)."""


class BreakerBoard:
    """Every tool's breaker; survives policy reloads. Its `states()` feed /metrics and heartbeats."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, shared: SharedState | None = None):
        self.clock = clock
        self.breakers: OrderedDict[str, Breaker] = OrderedDict()
        self.rejected = 0
        """Calls refused by an open breaker."""
        self.state_gauge = stage_metrics.gauge(
            shared, "toolmesh_circuit_breaker_state", "Per tool: 0 closed, 1 open, 2 half-open.", ("tool",))
        self.opened_total = stage_metrics.counter(
            shared, "toolmesh_circuit_breaker_opened_total", "Times a tool's breaker opened.", ("tool",))
        self.rejected_total = stage_metrics.counter(
            shared, "toolmesh_circuit_breaker_rejected_total", "Calls refused at once by an open breaker.", ("tool",))

    def changed(self, tool: str, breaker: Breaker) -> None:
        """Export a state change."""
        self.state_gauge.set(_STATE_VALUE[breaker.state], tool)

    def get(self, tool: str) -> Breaker:
        breaker = self.breakers.get(tool)
        if breaker is None:
            breaker = self.breakers[tool] = Breaker()
            while len(self.breakers) > MAX_TRACKED:
                # Closed breakers carry nothing worth keeping; drop the oldest of those first.
                victim = next((name for name, b in self.breakers.items() if b.state == CLOSED and name != tool), None)
                if victim is None:
                    break
                del self.breakers[victim]
        return breaker

    def states(self) -> dict[str, str]:
        """tool → "closed" | "open" | "half_open", for every tool that has failed since the sidecar started."""
        return {tool: b.state for tool, b in self.breakers.items()}

    def stats(self) -> dict[str, Any]:
        return {"states": self.states(), "rejected": self.rejected,
                "opened": {tool: b.opened for tool, b in self.breakers.items() if b.opened}}


class CircuitBreakerStage:
    """Refuses calls to a tool whose breaker is open; counts transient failures per tool."""

    def __init__(self, policy: CircuitBreakerPolicy, board: BreakerBoard):
        self.threshold = policy.failureThreshold
        self.open_seconds = policy.openSeconds
        self.half_open_calls = policy.halfOpenMaxCalls
        self.board = board

    async def __call__(self, ctx: CallContext, call_next: Handler) -> Outcome:
        tool = ctx.tool
        if tool is None:
            return await call_next(ctx)
        board = self.board
        breaker = board.breakers.get(tool)
        trial = False
        if breaker is not None and breaker.state != CLOSED:
            trial = await self._admit(ctx, tool, breaker)
        try:
            outcome = raise_if_unreadable(await call_next(ctx))
        except ProxyError as exc:
            if is_transient_error(exc):
                self._failed(tool, trial)
            else:
                self._ended(tool, trial, success=None)
            raise
        except BaseException:
            self._ended(tool, trial, success=None)
            raise
        if is_transient_outcome(outcome):
            self._failed(tool, trial)
        elif trial or breaker is not None:
            self._ended(tool, trial, success=True)
        return outcome

    async def _admit(self, ctx: CallContext, tool: str, breaker: Breaker) -> bool:
        """Let the call through (True when it is a half-open trial) or raise CircuitOpen."""
        reported = False
        while True:
            now = self.board.clock()
            if breaker.state == CLOSED:
                return False
            if breaker.state == OPEN:
                remaining = breaker.opened_at + self.open_seconds - now
                if remaining > 0:
                    self.board.rejected += 1
                    self.board.rejected_total.inc(tool)
                    raise CircuitOpen(f"circuit breaker open for tool {tool!r}: the upstream failed repeatedly",
                                      retry_after=remaining, data={"tool": tool, "state": OPEN})
                breaker.state = HALF_OPEN
                breaker.trials = 0
                breaker.verdict = asyncio.Event()
                self.board.changed(tool, breaker)
            if breaker.trials < self.half_open_calls:
                breaker.trials += 1
                return True
            # A trial is under way: wait for its verdict rather than refuse a call that may well succeed.
            if not reported:
                reported = True
                await _report_wait(ctx, tool)
            await breaker.verdict.wait()

    def _failed(self, tool: str, trial: bool) -> None:
        breaker = self.board.get(tool)
        if trial or breaker.state == HALF_OPEN:
            self._open(tool, breaker)
            return
        if breaker.state == CLOSED:
            breaker.failures += 1
            if breaker.failures >= self.threshold:
                self._open(tool, breaker)

    def _ended(self, tool: str, trial: bool, *, success: bool | None) -> None:
        breaker = self.board.breakers.get(tool)
        if breaker is None:
            return
        if trial and breaker.state == HALF_OPEN:
            breaker.trials -= 1
            if success:
                self._close(tool, breaker)
            elif breaker.trials <= 0:
                # The trial ended without a verdict (cancelled, refused): let the next call try.
                breaker.verdict.set()
                breaker.verdict = asyncio.Event()
        elif success and breaker.state == CLOSED:
            breaker.failures = 0

    def _open(self, tool: str, breaker: Breaker) -> None:
        breaker.state = OPEN
        breaker.opened_at = self.board.clock()
        breaker.failures = 0
        breaker.trials = 0
        breaker.opened += 1
        breaker.verdict.set()
        self.board.opened_total.inc(tool)
        self.board.changed(tool, breaker)
        log.warning("circuit breaker opened for %s", tool, extra={"event": "breaker_open", "tool": tool})

    def _close(self, tool: str, breaker: Breaker) -> None:
        breaker.state = CLOSED
        breaker.failures = 0
        breaker.trials = 0
        breaker.verdict.set()
        self.board.changed(tool, breaker)
        log.info("circuit breaker closed for %s", tool, extra={"event": "breaker_closed", "tool": tool})


async def _report_wait(ctx: CallContext, tool: str) -> None:
    token = ctx.progress_token
    if token is None:
        return
    params = {"progressToken": token, "progress": 0,
              "message": f"waiting for the circuit breaker's trial call of {tool} to finish"}
    await ctx.emit(SseEvent(data=dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})))


def build(policy: MCPToolPolicySpec, shared: SharedState) -> CircuitBreakerStage | None:
    """The breaker stage when the policy has a `circuitBreaker` section."""
    section = policy.circuitBreaker
    if section is None:
        return None
    board = shared.kept(CIRCUIT_BREAKER, lambda: BreakerBoard(shared=shared))
    return CircuitBreakerStage(section, board)
