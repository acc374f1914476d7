"""Budget, cache, timeout, retry and breaker fed random requests and random upstream answers: never an internal error."""

from __future__ import annotations

import json

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from toolmesh.sidecar.chain import state
from toolmesh.api.policy import MCPToolPolicySpec
from toolmesh.sidecar.chain.frame import Caller, CallContext, Outcome, compose, run_chain
from toolmesh.sidecar.chain.stages import budget, cache, circuit_breaker, retry, timeout
from toolmesh.sidecar.chain.state import SharedState

POLICY = MCPToolPolicySpec.model_validate({
    "cache": {"maxEntries": 50, "maxBytes": 20000, "tools": [{"tools": ["*"], "readOnly": True}]},
    "budget": {"totalTokens": 3000, "reservedForResponse": 100, "reservedForSystem": 100, "minAvailable": 50},
    "timeouts": {"callSeconds": 5},
    "retry": {"maxAttempts": 2, "baseDelayMs": 0, "maxDelayMs": 0, "force": True},
    "circuitBreaker": {"failureThreshold": 2, "openSeconds": 60},
})

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
content_items = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["text", "image", "resource", "resource_link", "audio"]) | st.text(max_size=5),
    "text": st.text(max_size=300) | json_values,
    "resource": json_values | st.fixed_dictionaries({"text": st.text(max_size=100)}),
    "uri": json_values, "name": json_values,
})
results = json_values | st.fixed_dictionaries({}, optional={
    "content": st.lists(content_items, max_size=4) | json_values,
    "isError": json_values, "structuredContent": json_values, "_meta": json_values,
    "ttlMs": json_values, "cacheScope": json_values,
})
answers = st.one_of(
    results.map(lambda r: ("result", r)),
    st.fixed_dictionaries({"code": st.integers(-33000, 0), "message": st.text(max_size=10)}).map(lambda e: ("error", e)),
    st.sampled_from([200, 502, 503, 504, 500]).map(lambda s: ("status", s)),
    st.binary(max_size=30).map(lambda b: ("raw", b)),
)
params = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["echo", "other"]) | json_values,
    "arguments": json_values,
    "uri": st.sampled_from(["toolmesh://results/x", "toolmesh://results/", "toolmesh://results/a?page=x",
                            "file:///a"]) | json_values,
    # Tokens as the proxy's JSON parser hands them over: it reads integers beyond 64 bits as floats.
    "_meta": json_values | st.fixed_dictionaries({"progressToken": st.text(max_size=5)
                                                  | st.integers(-2**63, 2**63 - 1)}),
})


@given(st.sampled_from(["tools/call", "resources/read", "tools/list", "ping"]), params, answers,
       st.sampled_from([None, "s1", "s2"]), st.sampled_from([None, "2025-11-25", "2026-07-28"]))
@example("tools/call", {"name": "echo"}, ("result", {"_meta": [[None, None]]}), None, None)  # _meta not an object
@example("tools/call", {"name": "echo"}, ("result", {"content": [{"type": "text", "text": "x"}]  # a cut ending on
                                                     + [{"type": "image"}] * 10 + [{"type": "text", "text": 7}]}),
         "s", None)  # a text item whose text is not a string
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
async def test_stages_never_fail_internally(method, call_params, answer, session, version):
    shared = SharedState("fuzz")
    shared.tools.update([{"name": "echo", "annotations": {"readOnlyHint": True}}])
    stages = [m.build(POLICY, shared) for m in (budget, cache, timeout, retry, circuit_breaker)]

    async def upstream(ctx: CallContext) -> Outcome:
        kind, value = answer
        if kind == "status":
            return Outcome(raw=b"upstream says no", status=value)
        if kind == "raw":
            return Outcome(raw=value)
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, kind: value})

    ctx = CallContext(method=method, request_id=1, params=call_params, raw=b"{}", headers={}, session_id=session,
                      protocol_version=version, caller=Caller("u", issuer="i"))
    handler = compose(stages, upstream)
    for _ in range(2):  # the second time may be answered from the cache
        outcome = await run_chain(handler, ctx)
        body = outcome.body()
        assert outcome.status != 500 or answer == ("status", 500), body  # 500 is the boundary's answer to a bug
        if body is None or outcome.status != 200:
            continue
        try:
            message = json.loads(body)
        except ValueError:
            # Only the upstream's own bytes may be unreadable (relayed as they came, never made up here).
            assert body in (b"upstream says no", answer[1]), body
            continue
        if isinstance(message, dict) and "error" in message:
            assert message["error"].get("message") != "internal proxy error", message
        if isinstance(message, dict) and "id" in message:
            assert message["id"] == 1
    assert orjson.dumps(shared.stage_state[state.CACHE].stats())
