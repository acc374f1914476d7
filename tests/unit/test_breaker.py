"""The circuit breaker as a pure object: closed → open → half-open → closed, per tool, with a deterministic clock."""

from __future__ import annotations

import asyncio

from helpers import yield_until

import orjson
import pytest

from toolmesh.sidecar.chain import state
from toolmesh.api.policy import MCPToolPolicySpec
from toolmesh.sidecar.chain.frame import CallContext, Outcome, SseEvent, run_chain
from toolmesh.sidecar.errors import Refused, UpstreamUnavailable
from toolmesh.sidecar.chain.stages import circuit_breaker as cb
from toolmesh.sidecar.chain.state import SharedState


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make_stage(**section):
    policy = MCPToolPolicySpec.model_validate({"circuitBreaker": {"failureThreshold": 3, "openSeconds": 10, **section}})
    shared = SharedState(server_name="srv")
    clock = Clock()
    shared.stage_state[state.CIRCUIT_BREAKER] = cb.BreakerBoard(clock)
    stage = cb.build(policy, shared)
    return stage, shared.stage_state[state.CIRCUIT_BREAKER], clock


def call(tool="lookup", events=None, token=None):
    params = {"name": tool, "arguments": {}}
    if token is not None:
        params["_meta"] = {"progressToken": token}

    async def emit(event: SseEvent):
        if events is not None:
            events.append(orjson.loads(event.data))

    return CallContext(method="tools/call", request_id=1, params=params, raw=b"", headers={}, emit=emit)


class Upstream:
    def __init__(self):
        self.calls = 0
        self.failing = True
        self.gate: asyncio.Event | None = None

    async def __call__(self, ctx):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            return Outcome(raw=b"unavailable", status=503)
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": {"content": []}})


async def test_opens_after_consecutive_failures_and_answers_at_once():
    stage, board, _ = make_stage()
    upstream = Upstream()
    for _ in range(3):
        assert (await stage(call(), upstream)).status == 503
    assert board.states() == {"lookup": "open"}
    outcome = await run_chain(lambda ctx: stage(ctx, upstream), call())
    assert upstream.calls == 3
    assert outcome.status == 503
    assert outcome.message["error"]["code"] == cb.CIRCUIT_OPEN
    assert outcome.message["error"]["data"]["retryAfterSeconds"] == 10
    assert outcome.headers["Retry-After"] == "10"
    assert "circuit breaker open" in outcome.message["error"]["message"]
    # Other tools are not affected.
    upstream.failing = False
    assert (await stage(call("other"), upstream)).status == 200


async def test_a_success_resets_the_consecutive_count():
    stage, board, _ = make_stage()
    upstream = Upstream()
    for _ in range(2):
        await stage(call(), upstream)
    upstream.failing = False
    await stage(call(), upstream)
    upstream.failing = True
    for _ in range(2):
        await stage(call(), upstream)
    assert board.states()["lookup"] == "closed"


async def test_exceptions_count_but_refusals_and_tool_errors_do_not():
    stage, board, _ = make_stage()

    async def refused(ctx):
        raise Refused("no")

    async def tool_error(ctx):
        return Outcome(message={"jsonrpc": "2.0", "id": 1, "result": {"isError": True, "content": []}})

    async def down(ctx):
        raise UpstreamUnavailable("down")

    for _ in range(5):
        with pytest.raises(Refused):
            await stage(call(), refused)
        await stage(call(), tool_error)
    assert board.states().get("lookup", "closed") == "closed"
    for _ in range(3):
        with pytest.raises(UpstreamUnavailable):
            await stage(call(), down)
    assert board.states()["lookup"] == "open"


async def test_half_open_trial_closes_on_success_and_reopens_on_failure():
    stage, board, clock = make_stage()
    upstream = Upstream()
    for _ in range(3):
        await stage(call(), upstream)
    clock.now += 10
    assert (await stage(call(), upstream)).status == 503  # the trial fails
    assert board.states()["lookup"] == "open"
    with pytest.raises(cb.CircuitOpen):
        await stage(call(), upstream)
    clock.now += 10
    upstream.failing = False
    assert (await stage(call(), upstream)).status == 200
    assert board.states()["lookup"] == "closed"
    assert board.stats()["opened"]["lookup"] == 2


async def test_calls_during_a_trial_wait_for_its_verdict_and_report_progress():
    stage, board, clock = make_stage()
    upstream = Upstream()
    for _ in range(3):
        await stage(call(), upstream)
    clock.now += 10
    upstream.failing = False
    upstream.gate = asyncio.Event()
    trial = asyncio.create_task(stage(call(), upstream))
    await yield_until(lambda: upstream.calls == 4, what="the trial call reaching the upstream")
    assert board.states()["lookup"] == "half_open"
    events: list = []
    waiter = asyncio.create_task(stage(call(events=events, token="t"), upstream))
    await yield_until(lambda: events, what="the waiting call reporting progress")
    assert upstream.calls == 4  # only the trial reached the upstream
    assert events and events[0]["method"] == "notifications/progress"
    upstream.gate.set()
    results = await asyncio.wait_for(asyncio.gather(trial, waiter), 5)
    assert [o.status for o in results] == [200, 200]
    assert board.states()["lookup"] == "closed"


async def test_tracked_breakers_are_bounded(monkeypatch):
    monkeypatch.setattr(cb, "MAX_TRACKED", 50)
    stage, board, _ = make_stage()

    async def down(ctx):
        raise UpstreamUnavailable("down")

    for i in range(200):
        with pytest.raises(UpstreamUnavailable):
            await stage(call(f"made-up-{i}"), down)
    assert len(board.breakers) <= 50


async def test_state_is_exported_to_metrics():
    from toolmesh.sidecar.telemetry import Telemetry

    shared = SharedState(server_name="srv", telemetry=Telemetry("srv", environ={}))
    policy = MCPToolPolicySpec.model_validate({"circuitBreaker": {"failureThreshold": 2}})
    stage = cb.build(policy, shared)
    upstream = Upstream()
    for _ in range(2):
        await stage(call(), upstream)
    with pytest.raises(cb.CircuitOpen):
        await stage(call(), upstream)
    text = shared.telemetry.render_metrics()
    assert 'toolmesh_circuit_breaker_state{tool="lookup"} 1' in text
    assert 'toolmesh_circuit_breaker_opened_total{tool="lookup"} 1' in text
    assert 'toolmesh_circuit_breaker_rejected_total{tool="lookup"} 1' in text
    assert shared.stage_state[state.CIRCUIT_BREAKER].states() == {"lookup": "open"}
