"""The cache stage as a pure object: what is cached, for whom, for how long, and how misses coalesce."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import orjson
import pytest

from toolmesh.sidecar.chain import state
from toolmesh.api.policy import MCPToolPolicySpec
from toolmesh.sidecar.chain.frame import Caller, CallContext, Outcome
from toolmesh.sidecar.errors import UpstreamUnavailable
from toolmesh.sidecar.chain.stages import cache
from toolmesh.sidecar.chain.state import SharedState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Upstream:
    """A fake next handler: counts calls and answers with a result naming the call number."""

    def __init__(self, result=None, gate: asyncio.Event | None = None, raw: bool = True):
        self.calls = 0
        self.result = result
        self.gate = gate
        self.raw = raw

    async def __call__(self, ctx: CallContext) -> Outcome:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        result = self.result if self.result is not None else {"content": [{"type": "text", "text": f"answer {self.calls}"}]}
        message = {"jsonrpc": "2.0", "id": ctx.request_id, "result": result}
        return Outcome(raw=orjson.dumps(message)) if self.raw else Outcome(message=message)


TOOLS = [
    {"name": "lookup", "annotations": {"readOnlyHint": True}},
    {"name": "remove", "annotations": {"destructiveHint": True}},
    {"name": "plain"},
    {"name": "weird", "annotations": {"readOnlyHint": True, "destructiveHint": True}},
]


def make_stage(spec: dict | None = None, clock: Clock | None = None):
    policy = MCPToolPolicySpec.model_validate(spec or {"cache": {}})
    shared = SharedState(server_name="srv")
    shared.tools.update(TOOLS)
    if clock is not None:
        shared.stage_state[state.CACHE] = cache.CacheState(policy.cache, clock)
    stage = cache.build(policy, shared)
    assert stage is not None
    return stage, shared


def call(tool: str, args: dict | None = None, *, rid: int | str = 1, subject: str = "alice", issuer: str = "iss") -> CallContext:
    params = {"name": tool, "arguments": args if args is not None else {"q": "x"}}
    return CallContext(method="tools/call", request_id=rid, params=params, raw=b"", headers={},
                       caller=Caller(subject=subject, issuer=issuer))


def text_of(outcome: Outcome) -> str:
    message = outcome.message or orjson.loads(outcome.raw)
    return message["result"]["content"][0]["text"]


def id_of(outcome: Outcome):
    return (outcome.message or orjson.loads(outcome.raw))["id"]


async def test_second_identical_call_is_answered_from_cache_with_its_own_id():
    stage, shared = make_stage()
    upstream = Upstream()
    first = await stage(call("lookup", rid=1), upstream)
    second = await stage(call("lookup", rid="second"), upstream)
    assert upstream.calls == 1
    assert text_of(first) == text_of(second) == "answer 1"
    assert id_of(second) == "second"
    assert shared.stage_state[state.CACHE].stats()["hits"] == 1
    assert shared.stage_state[state.CACHE].stats()["misses"] == 1


async def test_argument_order_does_not_matter_but_values_do():
    stage, _ = make_stage()
    upstream = Upstream()
    await stage(call("lookup", {"a": 1, "b": 2}), upstream)
    await stage(call("lookup", {"b": 2, "a": 1}), upstream)
    assert upstream.calls == 1
    await stage(call("lookup", {"a": 1, "b": 3}), upstream)
    assert upstream.calls == 2


@pytest.mark.parametrize("tool", ["remove", "plain", "weird"])
async def test_tools_not_read_only_or_destructive_are_never_cached(tool):
    stage, _ = make_stage()
    upstream = Upstream()
    await stage(call(tool), upstream)
    await stage(call(tool), upstream)
    assert upstream.calls == 2


async def test_policy_can_declare_a_tool_read_only_but_not_override_explicit_destruction():
    stage, _ = make_stage({"cache": {"tools": [{"tools": ["plain", "remove"], "readOnly": True}]}})
    upstream = Upstream()
    for _ in range(2):
        await stage(call("plain"), upstream)
    assert upstream.calls == 1
    for _ in range(2):
        await stage(call("remove"), upstream)
    assert upstream.calls == 3


async def test_tool_error_results_are_not_cached():
    stage, _ = make_stage()
    upstream = Upstream(result={"content": [{"type": "text", "text": "boom"}], "isError": True})
    await stage(call("lookup"), upstream)
    await stage(call("lookup"), upstream)
    assert upstream.calls == 2


async def test_jsonrpc_errors_are_not_cached():
    stage, _ = make_stage()
    calls = 0

    async def failing(ctx):
        nonlocal calls
        calls += 1
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "error": {"code": -32603, "message": "x"}}, status=200)

    await stage(call("lookup"), failing)
    await stage(call("lookup"), failing)
    assert calls == 2


async def test_subjects_are_isolated_unless_shared():
    stage, _ = make_stage()
    upstream = Upstream()
    await stage(call("lookup", subject="alice"), upstream)
    other = await stage(call("lookup", subject="bob"), upstream)
    assert upstream.calls == 2
    assert text_of(other) == "answer 2"
    # Same subject name from another issuer is someone else.
    await stage(call("lookup", subject="alice", issuer="other"), upstream)
    assert upstream.calls == 3

    stage, _ = make_stage({"cache": {"tools": [{"tools": ["look*"], "shared": True}]}})
    upstream = Upstream()
    await stage(call("lookup", subject="alice"), upstream)
    await stage(call("lookup", subject="bob"), upstream)
    assert upstream.calls == 1


async def test_result_cache_scope_public_shares_and_private_isolates():
    stage, _ = make_stage()
    upstream = Upstream(result={"content": [{"type": "text", "text": "pub"}], "cacheScope": "public", "ttlMs": 60000})
    await stage(call("lookup", subject="alice"), upstream)
    await stage(call("lookup", subject="bob"), upstream)
    assert upstream.calls == 1

    stage, _ = make_stage({"cache": {"tools": [{"tools": ["*"], "shared": True}]}})
    upstream = Upstream(result={"content": [{"type": "text", "text": "mine"}], "cacheScope": "private"})
    await stage(call("lookup", subject="alice"), upstream)
    await stage(call("lookup", subject="bob"), upstream)
    assert upstream.calls == 2


async def test_ttl_per_tool_and_result_ttl_ms():
    clock = Clock()
    stage, _ = make_stage({"cache": {"ttlSeconds": 300, "tools": [{"tools": ["lookup"], "ttlSeconds": 10}]}}, clock)
    upstream = Upstream()
    await stage(call("lookup"), upstream)
    clock.now += 9.9
    await stage(call("lookup"), upstream)
    assert upstream.calls == 1
    clock.now += 0.2
    await stage(call("lookup"), upstream)
    assert upstream.calls == 2

    clock = Clock()
    stage, _ = make_stage(None, clock)
    upstream = Upstream(result={"content": [], "ttlMs": 2000})
    await stage(call("lookup"), upstream)
    clock.now += 1.9
    await stage(call("lookup"), upstream)
    assert upstream.calls == 1
    clock.now += 0.2
    await stage(call("lookup"), upstream)
    assert upstream.calls == 2

    stage, _ = make_stage()
    upstream = Upstream(result={"content": [], "ttlMs": 0})
    await stage(call("lookup"), upstream)
    await stage(call("lookup"), upstream)
    assert upstream.calls == 2


async def test_bounded_by_entries_and_bytes_with_lru_eviction():
    stage, shared = make_stage({"cache": {"maxEntries": 3}})
    upstream = Upstream()
    for i in range(3):
        await stage(call("lookup", {"i": i}), upstream)
    await stage(call("lookup", {"i": 0}), upstream)  # 0 becomes most recent
    await stage(call("lookup", {"i": 3}), upstream)  # evicts 1
    assert upstream.calls == 4
    await stage(call("lookup", {"i": 0}), upstream)
    assert upstream.calls == 4
    await stage(call("lookup", {"i": 1}), upstream)
    assert upstream.calls == 5
    stats = shared.stage_state[state.CACHE].stats()
    assert stats["entries"] == 3 and stats["evictions"] >= 2

    stage, shared = make_stage({"cache": {"maxBytes": 200}})
    upstream = Upstream(result={"content": [{"type": "text", "text": "y" * 60}]})
    for i in range(10):
        await stage(call("lookup", {"i": i}), upstream)
    stats = shared.stage_state[state.CACHE].stats()
    assert stats["bytes"] <= 200 and stats["entries"] == 2


async def test_identical_concurrent_calls_coalesce_into_one_upstream_call():
    stage, shared = make_stage()
    gate = asyncio.Event()
    upstream = Upstream(gate=gate)
    tasks = [asyncio.create_task(stage(call("lookup", rid=i), upstream)) for i in range(5)]
    await asyncio.sleep(0)  # let every task reach the stage
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert upstream.calls == 1
    assert [id_of(o) for o in outcomes] == list(range(5))
    assert {text_of(o) for o in outcomes} == {"answer 1"}
    assert shared.stage_state[state.CACHE].coalesced == 4


async def test_followers_of_a_failed_call_call_upstream_themselves():
    stage, _ = make_stage()
    gate = asyncio.Event()
    calls = 0

    async def flaky(ctx):
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
            raise UpstreamUnavailable("down")
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": {"content": []}})

    first = asyncio.create_task(stage(call("lookup", rid=1), flaky))
    for _ in range(3):
        await asyncio.sleep(0)
    second = asyncio.create_task(stage(call("lookup", rid=2), flaky))
    for _ in range(3):
        await asyncio.sleep(0)
    gate.set()
    with pytest.raises(UpstreamUnavailable):
        await asyncio.wait_for(first, 5)
    outcome = await asyncio.wait_for(second, 5)
    assert id_of(outcome) == 2 and calls == 2


async def test_other_methods_and_disabled_policy_pass_through():
    stage, _ = make_stage()
    upstream = Upstream()
    ctx = CallContext(method="tools/list", request_id=1, params={}, raw=b"", headers={})
    await stage(ctx, upstream)
    await stage(ctx, upstream)
    assert upstream.calls == 2
    assert cache.build(MCPToolPolicySpec.model_validate({"cache": {"enabled": False}}), SharedState("s")) is None


async def test_state_survives_a_policy_reload():
    stage, shared = make_stage()
    upstream = Upstream()
    await stage(call("lookup"), upstream)
    reloaded = cache.build(MCPToolPolicySpec.model_validate({"cache": {"maxEntries": 10}}), shared)
    await reloaded(call("lookup"), upstream)
    assert upstream.calls == 1


async def test_hits_misses_and_evictions_are_in_the_metrics():
    from toolmesh.sidecar.telemetry import Telemetry

    shared = SharedState(server_name="srv", telemetry=Telemetry("srv", environ={}))
    shared.tools.update(TOOLS)
    stage = cache.build(MCPToolPolicySpec.model_validate({"cache": {"maxEntries": 1}}), shared)
    upstream = Upstream()
    await stage(call("lookup", {"i": 1}), upstream)
    await stage(call("lookup", {"i": 1}), upstream)
    await stage(call("lookup", {"i": 2}), upstream)
    text = shared.telemetry.render_metrics()
    assert 'toolmesh_cache_lookups_total{tool="lookup",result="hit"} 1' in text
    assert 'toolmesh_cache_lookups_total{tool="lookup",result="miss"} 2' in text
    assert "toolmesh_cache_evictions_total 1" in text
    assert "toolmesh_cache_entries 1" in text


async def test_many_distinct_subjects_stay_within_the_bounds():
    from toolmesh.sidecar.chain.stages import budget

    policy = MCPToolPolicySpec.model_validate({"cache": {"maxEntries": 100}, "budget": {"maxSessions": 100}})
    shared = SharedState(server_name="srv")
    shared.tools.update(TOOLS)
    budget_stage, cache_stage = budget.build(policy, shared), cache.build(policy, shared)
    upstream = Upstream()
    for i in range(20000):
        # Each caller in a session of its own: every one keeps a budget ledger (a call without a session or a
        # budget key keeps none).
        ctx = replace(call("lookup", {"q": i % 7}, subject=f"subject-{i}"), session_id=f"session-{i}")
        await budget_stage(ctx, lambda c: cache_stage(c, upstream))
    assert shared.stage_state[state.BUDGET].local.ledger_count() == 100
    assert shared.stage_state[state.CACHE].stats()["entries"] == 100
    assert not shared.stage_state[state.CACHE].in_flight


async def test_hit_rate_per_tool_reaches_the_heartbeat():
    from toolmesh.sidecar.control.heartbeat import _tool_stats

    stage, shared = make_stage()
    upstream = Upstream()
    for _ in range(4):
        await stage(call("lookup"), upstream)
    assert shared.stage_state[state.CACHE].hit_rates() == {"lookup": 0.75}
    assert _tool_stats(shared)["lookup"]["cache_hit_rate"] == 0.75
