"""The budget stage as a pure object: real token counts, truncation with a readable link, exhaustion, isolation."""

from __future__ import annotations

import orjson
import pytest

from toolmesh.sidecar.chain import state
from toolmesh.api.policy import MCPToolPolicySpec
from toolmesh.sidecar.chain.frame import Caller, CallContext, Outcome, run_chain
from toolmesh.sidecar.chain.stages.results_store import ResultNotFound, parse_uri
from toolmesh.sidecar.store.local import LocalStore
from toolmesh.sidecar.chain.stages import budget
from toolmesh.sidecar.chain.state import SharedState
from toolmesh.sidecar.chain.stages.tokenizer import Tokenizer

TOKENIZER = Tokenizer()
WORDS = " ".join(f"w{i}" for i in range(3000))  # a few thousand tokens of distinct text


class Upstream:
    def __init__(self, text: str = "short answer", structured: bool = False):
        self.calls = 0
        self.text = text
        self.structured = structured

    async def __call__(self, ctx: CallContext) -> Outcome:
        self.calls += 1
        result = {"content": [{"type": "text", "text": self.text}]}
        if self.structured:
            result["structuredContent"] = {"result": self.text}
        return Outcome(raw=orjson.dumps({"jsonrpc": "2.0", "id": ctx.request_id, "result": result}))


def make_stage(**section):
    policy = MCPToolPolicySpec.model_validate({"budget": {"totalTokens": 20000, "reservedForResponse": 1000,
                                                          "reservedForSystem": 1000, **section}})
    shared = SharedState(server_name="srv")
    stage = budget.build(policy, shared)
    assert stage is not None
    return stage, shared.stage_state[state.BUDGET]


def call(tool="read", *, session="s1", subject="alice", rid=1, headers=None):
    return CallContext(method="tools/call", request_id=rid, params={"name": tool, "arguments": {}}, raw=b"",
                       headers=headers or {}, session_id=session, caller=Caller(subject=subject, issuer="iss"))


def read(uri, *, session="s1", subject="alice", rid=9):
    return CallContext(method="resources/read", request_id=rid, params={"uri": uri}, raw=b"", headers={},
                       session_id=session, caller=Caller(subject=subject, issuer="iss"))


def result_of(outcome: Outcome):
    message = outcome.message if outcome.raw is None else orjson.loads(outcome.raw)
    return message["result"]


async def test_small_results_pass_and_are_counted_in_real_tokens():
    stage, _ = make_stage()
    upstream = Upstream("The quick brown fox jumps over the lazy dog.")
    result = result_of(await stage(call(), upstream))
    assert result["content"][0]["text"] == upstream.text
    meta = result["_meta"][budget.META_KEY]
    assert meta["resultTokens"] == TOKENIZER.count(upstream.text) == 10
    assert meta["used"] == 10 and meta["available"] == 18000 - 10 and meta["truncated"] is False


async def test_large_result_is_truncated_with_notice_and_link_readable_by_pages():
    stage, state = make_stage()
    upstream = Upstream(WORDS, structured=True)
    total = TOKENIZER.count(WORDS)
    limit = int(18000 * 0.3)
    assert total > limit
    result = result_of(await stage(call(), upstream))
    text = result["content"][0]["text"]
    assert f"[TRUNCATED: {total} tokens → {limit} tokens." in text
    assert TOKENIZER.count(text) <= limit
    assert WORDS.startswith(text.split("\n\n[TRUNCATED")[0])
    assert result["structuredContent"] == {"result": text}
    link = result["content"][-1]
    assert link["type"] == "resource_link" and link["uri"].startswith("toolmesh://results/")
    assert result["_meta"][budget.META_KEY]["used"] == limit

    pages, uri = [], link["uri"]
    while uri:
        page = result_of(await stage(read(uri), Upstream()))["contents"][0]
        pages.append(page["text"])
        uri = page["_meta"]["io.toolmesh/page"].get("next")
        assert len(pages) < 50
    assert "".join(pages) == WORDS
    assert len(pages) == -(-total // 2000)
    assert state.truncations == 1


async def test_another_subject_cannot_read_the_link():
    stage, _ = make_stage()
    result = result_of(await stage(call(), Upstream(WORDS)))
    uri = result["content"][-1]["uri"]
    outcome = await run_chain(lambda ctx: stage(ctx, Upstream()), read(uri, subject="mallory"))
    message = outcome.message
    assert "error" in message and message["id"] == 9
    assert message["error"]["code"] == -32602
    # Unknown ids and foreign ids look the same.
    unknown = await run_chain(lambda ctx: stage(ctx, Upstream()), read("toolmesh://results/nope"))
    assert unknown.message["error"]["message"].startswith("Resource not found")


async def test_exhausted_budget_answers_without_calling_upstream():
    stage, state = make_stage(totalTokens=8000, minAvailable=500)
    upstream = Upstream(WORDS)
    for _ in range(20):
        result = result_of(await stage(call(), upstream))
        if result["_meta"][budget.META_KEY].get("exhausted"):
            break
    else:
        pytest.fail("budget never ran out")
    calls = upstream.calls
    assert result["content"][0]["text"].startswith("[BUDGET EXHAUSTED:")
    assert result["isError"] is True
    await stage(call(), upstream)
    assert upstream.calls == calls
    # Another session has its own budget.
    fresh = result_of(await stage(call(session="s2"), Upstream("hi")))
    assert fresh["content"][0]["text"] == "hi"
    assert state.exhausted == 2


async def test_stateless_budgets_are_per_subject_and_budget_key():
    stage, _ = make_stage()
    headers_a = {"Mcp-Budget-Key": "conversation-1"}
    await stage(call(session=None, headers=headers_a), Upstream(WORDS))
    again = result_of(await stage(call(session=None, headers=headers_a), Upstream("x")))
    assert again["_meta"][budget.META_KEY]["used"] > 1000
    other_key = result_of(await stage(call(session=None, headers={"Mcp-Budget-Key": "conversation-2"}), Upstream("x")))
    assert other_key["_meta"][budget.META_KEY]["used"] == 1
    other_subject = result_of(await stage(call(session=None, subject="bob", headers=headers_a), Upstream("x")))
    assert other_subject["_meta"][budget.META_KEY]["used"] == 1


async def test_budgets_are_bounded_and_expire():
    now = [0.0]
    policy = MCPToolPolicySpec.model_validate({"budget": {"maxSessions": 3, "sessionTtlSeconds": 10}})
    shared = SharedState(server_name="srv")
    shared.stage_state[state.BUDGET] = budget.BudgetState(clock=lambda: now[0])
    stage = budget.build(policy, shared)
    for i in range(10):
        await stage(call(session=f"s{i}"), Upstream())
    ledgers = shared.stage_state[state.BUDGET].local
    assert ledgers.ledger_count() == 3
    now[0] = 11
    await stage(call(session="late"), Upstream())
    assert ledgers.ledger_count() == 1
    assert await ledgers.ledger_used(budget.budget_key(call(session="late"))) > 0


async def test_stored_results_are_bounded_expire_and_check_the_owner():
    now = [0.0]
    store = LocalStore(clock=lambda: now[0], max_results=2, max_result_bytes=1000)
    await store.put_result("first", "a", ["one"], 1, ttl=5)
    await store.put_result("second", "a", ["two", "three"], 2, ttl=5)
    assert (await store.read_result("second", "a", 2)).text == "three"
    assert await store.read_result("second", "b", 1) is None
    assert await store.read_result("second", "a", 3) is None
    await store.put_result("third", "a", ["x"], 1, ttl=5)
    assert await store.read_result("first", "a", 1) is None  # evicted: over max_results
    await store.put_result("fourth", "a", ["y" * 900], 1, ttl=5)
    assert store.result_bytes <= 1000
    now[0] = 6
    assert await store.read_result("fourth", "a", 1) is None
    with pytest.raises(ResultNotFound):
        parse_uri("toolmesh://elsewhere/x")


async def test_cached_answers_are_counted_and_truncated_per_caller():
    from toolmesh.sidecar.chain.frame import compose
    from toolmesh.sidecar.chain.stages import cache

    policy = MCPToolPolicySpec.model_validate({
        "budget": {"totalTokens": 20000, "reservedForResponse": 1000, "reservedForSystem": 1000},
        "cache": {"tools": [{"tools": ["read"], "readOnly": True, "shared": True}]}})
    shared = SharedState(server_name="srv")
    upstream = Upstream(WORDS)
    handler = compose([budget.build(policy, shared), cache.build(policy, shared)], upstream)
    first = result_of(await handler(call(subject="alice")))
    second = result_of(await handler(call(subject="bob", session="s2")))
    assert upstream.calls == 1  # bob's answer came from the shared cache...
    assert second["_meta"][budget.META_KEY]["used"] == first["_meta"][budget.META_KEY]["used"] > 0  # ...and cost him
    alice_link, bob_link = first["content"][-1]["uri"], second["content"][-1]["uri"]
    assert alice_link != bob_link  # each got a link of their own
    outcome = await run_chain(lambda ctx: handler(ctx), read(alice_link, subject="bob", session="s2"))
    assert "error" in outcome.message


async def test_pages_are_charged_and_refused_once_the_budget_cannot_afford_them():
    stage, _ = make_stage(totalTokens=10000, reservedForResponse=1000, reservedForSystem=1000, minAvailable=500)
    result = result_of(await stage(call(), Upstream(WORDS)))
    uri = result["content"][-1]["uri"]
    handler = lambda ctx: stage(ctx, Upstream())  # noqa: E731
    outcomes = []
    for _ in range(6):
        outcomes.append(await run_chain(handler, read(uri)))
    refused = [o.message["error"] for o in outcomes if "error" in o.message]
    assert refused and refused[0]["code"] == -32007
    assert refused[0]["message"].startswith("[BUDGET EXHAUSTED:")
    # Every page that was served was charged.
    served = [o for o in outcomes if "result" in o.message]
    assert served[-1].message["result"]["_meta"][budget.META_KEY]["used"] == int(8000 * 0.3) + 2000 * len(served)
