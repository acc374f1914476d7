"""Call timeouts that progress extends: each `notifications/progress` buys more time, up to a hard maximum.

Progress notifications reach the client as they arrive (through `ctx.emit`);
this stage only watches them go by. When a call runs out of time the work in
flight is cancelled (which closes the upstream stream), the upstream is told
with `notifications/cancelled` where the protocol has sessions, and the client
gets `UpstreamTimeout` (504).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass, replace
from typing import Any

from toolmesh.api.policy import MCPToolPolicySpec, TimeoutPolicy
from toolmesh.sidecar.telemetry import stage_metrics
from toolmesh.sidecar.chain.frame import NOTIFICATION, REQUEST, CallContext, Handler, Outcome, SseEvent, derive
from toolmesh.sidecar.errors import UpstreamTimeout, dumps
from toolmesh.sidecar.chain.state import SharedState

NAME = "timeout"
log = logging.getLogger("toolmesh.sidecar.timeout")

_PROGRESS = b"notifications/progress"
# Requests an upstream sends the client in the middle of a call, whose answers may take a person's time.
_ASKS_THE_CLIENT = (b'"elicitation/create"', b'"sampling/createMessage"', b'"roots/list"')
# From this revision on cancellation is closing the response stream; no notification exists.
_STATELESS_ERA = "2026-07-28"


@dataclass(slots=True)
class _Timer:
    """The running call's deadline, reachable by inner stages of the same call."""

    scope: asyncio.Timeout
    hard_deadline: float
    extension: float
    loop: asyncio.AbstractEventLoop

    def extend(self, seconds: float) -> None:
        """Move the deadline to at least `seconds` from now, never past the hard maximum."""
        when = self.scope.when()
        target = min(self.hard_deadline, self.loop.time() + seconds)
        if when is not None and target > when and not self.scope.expired():
            self.scope.reschedule(target)


_timer: contextvars.ContextVar[_Timer | None] = contextvars.ContextVar("toolmesh_call_timer", default=None)


def excuse_wait(seconds: float) -> None:
    """A wait the sidecar itself makes (a retry delay) does not count as upstream silence.

    The deadline moves to the end of the wait plus one progress extension, within the hard
    maximum; a no-op when the call has no timeout.
    """
    timer = _timer.get()
    if timer is not None:
        timer.extend(seconds + max(timer.extension, 0.0))


class TimeoutStage:
    """Bounds every request's time; progress from the upstream (or from retry waits) extends the bound."""

    def __init__(self, policy: TimeoutPolicy, shared: SharedState | None = None):
        self.call_seconds = policy.callSeconds
        self.extension = policy.progressExtensionSeconds
        self.max_seconds = policy.maxSeconds
        self.timeouts = 0
        """Calls ended by this stage (for stats)."""
        self.timeouts_total = stage_metrics.counter(
            shared, "toolmesh_timeouts_total", "Requests ended by the sidecar's timeout, by tool.", ("tool",))

    async def __call__(self, ctx: CallContext, call_next: Handler) -> Outcome:
        if ctx.kind != REQUEST or ctx.request_id is None:
            return await call_next(ctx)
        loop = asyncio.get_running_loop()
        start = loop.time()
        hard_deadline = start + self.max_seconds
        extension = self.extension
        client_emit = ctx.emit
        scope: asyncio.Timeout | None = None
        timer: _Timer | None = None

        async def emit(event: SseEvent) -> None:
            if timer is not None:
                data = event.data
                if extension > 0 and _PROGRESS in data:
                    timer.extend(extension)
                elif any(method in data for method in _ASKS_THE_CLIENT):
                    # The upstream now waits on the client (a person may be answering): not silence.
                    # Only the hard maximum bounds the call from here on.
                    timer.extend(self.max_seconds)
            await client_emit(event)

        token = None
        try:
            async with asyncio.timeout(min(self.call_seconds, self.max_seconds)) as scope:
                timer = _Timer(scope, hard_deadline, extension, loop)
                token = _timer.set(timer)
                return await call_next(derive(ctx, emit=emit))
        except TimeoutError:
            if scope is None or not scope.expired():
                raise  # a timeout inside the call, not ours: already typed by the layer below
            self.timeouts += 1
            self.timeouts_total.inc(ctx.tool or "")
            elapsed = loop.time() - start
            await self._cancel_upstream(ctx, call_next)
            raise UpstreamTimeout(f"upstream did not answer within {elapsed:.1f}s",
                                  data={"elapsedSeconds": round(elapsed, 3), "maxSeconds": self.max_seconds}) from None
        finally:
            if token is not None:
                _timer.reset(token)

    async def _cancel_upstream(self, ctx: CallContext, call_next: Handler) -> None:
        """Tell the upstream to stop working on the request (session era); best effort, never raises."""
        if ctx.protocol_version is not None and ctx.protocol_version >= _STATELESS_ERA:
            return
        params = {"requestId": ctx.request_id, "reason": "timed out at the toolmesh sidecar"}
        raw = dumps({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})
        cancel = replace(ctx, kind=NOTIFICATION, method="notifications/cancelled", request_id=None,
                         params=params, raw=raw, params_changed=False)
        try:
            async with asyncio.timeout(5):
                await call_next(cancel)
        except Exception as exc:  # noqa: BLE001 - the client's answer (504) must not depend on this
            log.info("could not forward cancellation upstream: %r", exc)


def build(policy: MCPToolPolicySpec, shared: SharedState) -> TimeoutStage | None:
    """The timeout stage when the policy has a `timeouts` section."""
    section = policy.timeouts
    if section is None:
        return None
    return TimeoutStage(section, shared)
