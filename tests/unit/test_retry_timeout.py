"""The timeout stage as a pure object: progress extends a call up to the hard maximum; a timeout cancels upstream."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import orjson
import pytest

from toolmesh.api.policy import MCPToolPolicySpec
from toolmesh.sidecar.chain.frame import NOTIFICATION, CallContext, Outcome, SseEvent
from toolmesh.sidecar.errors import UpstreamTimeout
from toolmesh.sidecar.chain.stages import timeout
from toolmesh.sidecar.chain.state import SharedState


def make_stage(**section):
    policy = MCPToolPolicySpec.model_validate({"timeouts": section})
    return timeout.build(policy, SharedState(server_name="srv"))


def call(events: list, version: str | None = "2025-11-25"):
    async def emit(event: SseEvent):
        events.append(orjson.loads(event.data))

    params = {"name": "work", "arguments": {}, "_meta": {"progressToken": "p"}}
    return CallContext(method="tools/call", request_id=42, params=params, raw=b"",
                       headers={}, session_id="s", protocol_version=version, emit=emit)


def progress(n: int) -> SseEvent:
    return SseEvent(data=orjson.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                                       "params": {"progressToken": "p", "progress": n}}))


class Worker:
    """A fake upstream: sends `steps` progress events `interval` apart, then answers; records cancellations."""

    def __init__(self, steps: int, interval: float):
        self.steps, self.interval = steps, interval
        self.cancelled: list = []
        self.interrupted = False

    async def __call__(self, ctx: CallContext) -> Outcome:
        if ctx.kind == NOTIFICATION:
            self.cancelled.append(orjson.loads(ctx.raw))
            return Outcome(status=202)
        try:
            for i in range(self.steps):
                await asyncio.sleep(self.interval)
                await ctx.emit(progress(i + 1))
            await asyncio.sleep(self.interval)
        except asyncio.CancelledError:
            self.interrupted = True
            raise
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": {"content": []}})


async def test_progress_extends_the_call_past_its_timeout_and_passes_through():
    stage = make_stage(callSeconds=0.3, progressExtensionSeconds=0.3, maxSeconds=5)
    events: list = []
    worker = Worker(steps=6, interval=0.1)  # 0.7 s in all, never 0.3 s without progress
    outcome = await stage(call(events), worker)
    assert outcome.message["result"] == {"content": []}
    assert [e["params"]["progress"] for e in events] == [1, 2, 3, 4, 5, 6]


async def test_silence_times_out_with_504_and_cancels_upstream():
    stage = make_stage(callSeconds=0.2, progressExtensionSeconds=1, maxSeconds=5)
    worker = Worker(steps=0, interval=3)
    began = time.monotonic()
    with pytest.raises(UpstreamTimeout) as err:
        await stage(call([]), worker)
    assert time.monotonic() - began < 2
    assert err.value.status == 504
    assert worker.interrupted
    assert worker.cancelled == [{"jsonrpc": "2.0", "method": "notifications/cancelled",
                                 "params": {"requestId": 42, "reason": "timed out at the toolmesh sidecar"}}]


async def test_progress_never_extends_past_the_hard_maximum():
    stage = make_stage(callSeconds=0.2, progressExtensionSeconds=0.2, maxSeconds=0.5)
    worker = Worker(steps=100, interval=0.05)
    began = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await stage(call([]), worker)
    assert 0.45 < time.monotonic() - began < 2


async def test_stateless_era_cancels_by_closing_the_stream_only():
    stage = make_stage(callSeconds=0.1, maxSeconds=1)
    worker = Worker(steps=0, interval=3)
    with pytest.raises(UpstreamTimeout):
        await stage(call([], version="2026-07-28"), worker)
    assert worker.interrupted and worker.cancelled == []


async def test_notifications_are_not_timed():
    stage = make_stage(callSeconds=0.1, maxSeconds=0.1)
    seen = []

    async def upstream(ctx):
        await asyncio.sleep(0.3)
        seen.append(ctx.method)
        return Outcome(status=202)

    note = CallContext(method="notifications/initialized", request_id=None, params={}, raw=b"{}", headers={},
                       kind=NOTIFICATION)
    await stage(note, upstream)
    assert seen == ["notifications/initialized"]


async def test_a_retry_wait_does_not_count_as_silence_but_the_hard_maximum_holds():
    from toolmesh.sidecar.chain.stages.retry import RetryStage

    policy = MCPToolPolicySpec.model_validate({
        "timeouts": {"callSeconds": 0.3, "progressExtensionSeconds": 0.3, "maxSeconds": 5},
        "retry": {"maxAttempts": 2, "baseDelayMs": 500, "maxDelayMs": 500, "jitter": "none", "force": True}})
    shared = SharedState(server_name="srv")
    outer = timeout.build(policy, shared)
    retrying = RetryStage(policy.retry, shared.tools, spec=policy)
    attempts = 0

    async def upstream(ctx):
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            return Outcome(raw=b"busy", status=503)
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": {"content": []}})

    outcome = await outer(call([]), lambda ctx: retrying(ctx, upstream))
    assert attempts == 2 and outcome.status == 200

    capped = timeout.build(MCPToolPolicySpec.model_validate({"timeouts": {"callSeconds": 0.3, "maxSeconds": 0.4}}),
                           shared)
    attempts = 0
    with pytest.raises(UpstreamTimeout):
        await capped(call([]), lambda ctx: retrying(ctx, upstream))


async def test_a_question_to_the_client_suspends_the_silence_timeout_until_the_hard_maximum():
    stage = make_stage(callSeconds=0.2, progressExtensionSeconds=0.2, maxSeconds=5)
    asked = SseEvent(data=orjson.dumps({"jsonrpc": "2.0", "id": 9, "method": "elicitation/create",
                                        "params": {"message": "Favourite colour?"}}))

    async def upstream(ctx):
        await ctx.emit(asked)
        await asyncio.sleep(0.6)  # the person takes their time answering
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": {"content": []}})

    events: list = []
    ctx = call(events)
    ctx = replace(ctx, params={"name": "work", "arguments": {}})  # no progress token: questions still count
    outcome = await stage(ctx, upstream)
    assert outcome.message["result"] == {"content": []}
    assert events[0]["method"] == "elicitation/create"
