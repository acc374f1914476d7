"""Rate-limit stage as a pure object: token buckets per subject and per tool, 429 with Retry-After, bounded memory."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from multidict import CIMultiDict

from toolmesh.sidecar.chain import state
from toolmesh.api.policy import PolicyFile
from toolmesh.sidecar.chain.frame import CallContext, Caller, Outcome, run_chain
from toolmesh.sidecar.chain.stages import rate_limit
from toolmesh.sidecar.store.local import LocalStore as Buckets
from toolmesh.sidecar.chain.state import SharedState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def call(tool: str = "echo", subject: str = "alice", method: str = "tools/call") -> CallContext:
    params = {"name": tool, "arguments": {}} if method == "tools/call" else {}
    ctx = CallContext(method=method, request_id=1, params=params, raw=b"", headers=CIMultiDict())
    return replace(ctx, caller=Caller(subject=subject, issuer="i"))


async def answer(ctx: CallContext) -> Outcome:
    return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": {}})


def stage_for(section: dict, clock: Clock):
    shared = SharedState("s")
    shared.stage_state[state.RATE_LIMIT] = Buckets(10**6, clock)
    return rate_limit.build(PolicyFile.parse({"rateLimit": section}), shared), shared


async def statuses(stage, ctx: CallContext, n: int) -> list[int]:
    return [(await run_chain(lambda c: stage(c, answer), ctx)).status for _ in range(n)]


async def test_burst_then_429_with_retry_after_then_refill():
    clock = Clock()
    stage, _ = stage_for({"requestsPerSecond": 2, "burst": 3}, clock)
    assert await statuses(stage, call(), 3) == [200, 200, 200]
    outcome = await run_chain(lambda c: stage(c, answer), call())
    assert outcome.status == 429
    assert outcome.headers["Retry-After"] == "1"
    error = json.loads(outcome.body())["error"]
    assert error["data"]["retryAfterSeconds"] == pytest.approx(0.5)
    clock.now += 0.5
    assert await statuses(stage, call(), 2) == [200, 429]


async def test_subjects_have_their_own_buckets():
    clock = Clock()
    stage, _ = stage_for({"requestsPerSecond": 1, "burst": 1}, clock)
    assert await statuses(stage, call(subject="alice"), 2) == [200, 429]
    assert await statuses(stage, call(subject="bob"), 1) == [200]


async def test_per_tool_buckets_and_overrides():
    clock = Clock()
    stage, _ = stage_for(
        {"requestsPerSecond": 1, "burst": 2, "tools": [{"tools": ["report_*"], "requestsPerSecond": 0.1, "burst": 1}]},
        clock,
    )
    assert await statuses(stage, call("report_sales"), 2) == [200, 429]
    # The expensive tool's bucket is separate: the subject's own bucket is still full.
    assert await statuses(stage, call("echo"), 3) == [200, 200, 429]
    clock.now += 1.0
    assert await statuses(stage, call("report_sales"), 1) == [429]  # 0.1/s: ten seconds per call

    stage, _ = stage_for({"requestsPerSecond": 1, "burst": 1, "perTool": True}, Clock())
    assert await statuses(stage, call("a"), 2) == [200, 429]
    assert await statuses(stage, call("b"), 1) == [200]


async def test_memory_stays_bounded_under_many_subjects():
    clock = Clock()
    shared = SharedState("s")
    stage = rate_limit.build(PolicyFile.parse({"rateLimit": {"maxSubjects": 1000}}), shared)
    buckets = shared.stage_state[state.RATE_LIMIT]
    for i in range(100_000):
        assert await stage(call(subject=f"user-{i}"), answer)
    assert len(buckets) == 1000
    assert buckets.evictions == 99_000


async def test_buckets_survive_a_policy_reload():
    clock = Clock()
    stage, shared = stage_for({"requestsPerSecond": 1, "burst": 1}, clock)
    assert await statuses(stage, call(), 1) == [200]
    reloaded = rate_limit.build(PolicyFile.parse({"rateLimit": {"requestsPerSecond": 1, "burst": 1}}), shared)
    assert await statuses(reloaded, call(), 1) == [429]


def test_no_section_no_stage():
    assert rate_limit.build(PolicyFile.parse({}), SharedState("s")) is None
