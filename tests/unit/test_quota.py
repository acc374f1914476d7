"""Quotas: calls and result tokens per subject per window, refused with 429 naming the quota until the window resets."""

from __future__ import annotations

import orjson
import pytest

from toolmesh.api.policy import MCPToolPolicySpec
from toolmesh.sidecar.chain import state
from toolmesh.sidecar.chain.frame import CallContext, CallRecord, Caller, Outcome, compose, derive, run_chain
from toolmesh.sidecar.chain.stages import quota
from toolmesh.sidecar.chain.state import SharedState
from toolmesh.sidecar.store.local import LocalStore


class Upstream:
    def __init__(self, tokens: int = 0):
        self.calls = 0
        self.tokens = tokens

    async def __call__(self, ctx: CallContext) -> Outcome:
        self.calls += 1
        if ctx.record is not None:
            ctx.record.result_tokens = self.tokens  # as the budget stage would have counted them
        return Outcome(raw=orjson.dumps({"jsonrpc": "2.0", "id": ctx.request_id, "result": {"content": []}}))


def stage(rules: list[dict], clock: list[float], **section):
    shared = SharedState("s")
    shared.stage_state[state.QUOTAS] = LocalStore(wall=lambda: clock[0])
    spec = {"quota": {"rules": rules, **section}}
    if any("resultTokens" in rule for rule in rules):
        spec["budget"] = {"totalTokens": 100_000}
    return quota.build(MCPToolPolicySpec.model_validate(spec), shared)


def call(tool: str = "search", subject: str = "alice", method: str = "tools/call") -> CallContext:
    ctx = CallContext(method=method, request_id=1, params={"name": tool, "arguments": {}}, raw=b"", headers={},
                      caller=Caller(subject=subject, issuer="iss"))
    return derive(ctx, record=CallRecord(caller=ctx.caller))


async def statuses(handler, n: int, **kwargs) -> list[int]:
    return [(await run_chain(handler, call(**kwargs))).status for _ in range(n)]


async def test_a_calls_quota_refuses_with_429_naming_it_until_its_window_resets():
    clock = [86_400 * 100 + 3_600.0]  # 01:00 UTC
    upstream = Upstream()
    handler = compose([stage([{"name": "daily-calls", "calls": 3, "window": "day"}], clock)], upstream)
    assert await statuses(handler, 4) == [200, 200, 200, 429]
    refused = await run_chain(handler, call())
    error = orjson.loads(refused.body())["error"]
    assert error["code"] == -32005 and "quota 'daily-calls' used up: 3 calls per day" in error["message"]
    assert error["data"]["quota"] == "daily-calls" and refused.headers["Retry-After"] == str(23 * 3600)
    assert upstream.calls == 3
    assert await statuses(handler, 1, subject="bob") == [200]  # per subject
    clock[0] += 23 * 3600  # 00:00 UTC: a new day
    assert await statuses(handler, 1) == [200]


async def test_quotas_count_only_the_tools_they_name_and_per_tool_when_asked():
    clock = [0.0]
    handler = compose([stage([{"name": "writes", "calls": 1, "window": "hour", "tools": ["write_*"], "perTool": True}],
                             clock)], Upstream())
    assert await statuses(handler, 3, tool="search") == [200, 200, 200]
    assert await statuses(handler, 2, tool="write_a") == [200, 429]
    assert await statuses(handler, 1, tool="write_b") == [200]
    # Listing is protocol chatter, never counted.
    assert await statuses(handler, 3, method="tools/list") == [200, 200, 200]


async def test_a_token_quota_lets_the_crossing_call_finish_and_refuses_the_next():
    clock = [0.0]
    handler = compose([stage([{"name": "tokens", "resultTokens": 50, "window": "minute"}], clock)], Upstream(tokens=30))
    assert await statuses(handler, 3) == [200, 200, 429]


async def test_a_call_refused_by_one_quota_gives_back_what_another_took():
    clock = [0.0]
    rules = [{"name": "per-day", "calls": 10, "window": "day"}, {"name": "per-minute", "calls": 2, "window": "minute"}]
    handler = compose([stage(rules, clock)], Upstream())
    assert await statuses(handler, 5) == [200, 200, 429, 429, 429]
    clock[0] += 60
    # Only the 2 calls that ran count towards the day: 8 more fit in it, 2 per minute.
    results = []
    for _ in range(4):
        results += await statuses(handler, 2)
        clock[0] += 60
    assert results == [200] * 8
    assert await statuses(handler, 1) == [429]


def test_a_quota_must_count_something_and_token_quotas_need_a_budget():
    with pytest.raises(ValueError, match="counts nothing"):
        MCPToolPolicySpec.model_validate({"quota": {"rules": [{"name": "x"}]}})
    with pytest.raises(ValueError, match="needs budget"):
        MCPToolPolicySpec.model_validate({"quota": {"rules": [{"name": "x", "resultTokens": 5}]}})
    with pytest.raises(ValueError, match="unique"):
        MCPToolPolicySpec.model_validate({"quota": {"rules": [{"name": "x", "calls": 1}, {"name": "x", "calls": 2}]}})


async def test_the_example_policy_builds_quotas_that_refuse_the_call_over_its_allowance():
    import yaml

    from helpers import ROOT

    manifest = yaml.safe_load((ROOT / "examples" / "policies" / "quota.yaml").read_text())
    spec = MCPToolPolicySpec.model_validate(manifest["spec"])
    assert [rule.name for rule in spec.quota.rules] == ["daily-calls", "report-tokens"]
    shared = SharedState("s")
    shared.stage_state[state.QUOTAS] = LocalStore(wall=lambda: 0.0)
    handler = compose([quota.build(spec, shared)], Upstream())
    assert set(await statuses(handler, 1000)) == {200}
    assert await statuses(handler, 1) == [429]
