"""The budget stage forgets a session's budget when the session ends, and failed calls cost nothing."""

from __future__ import annotations

import orjson

from toolmesh.sidecar.chain import state
from toolmesh.api.policy import MCPToolPolicySpec
from toolmesh.sidecar.chain.frame import Caller, CallContext, Outcome
from toolmesh.sidecar.chain.stages import budget
from toolmesh.sidecar.chain.state import SharedState

WORDS = " ".join(f"w{i}" for i in range(3000))


async def upstream(ctx: CallContext) -> Outcome:
    result = {"content": [{"type": "text", "text": WORDS}]}
    return Outcome(raw=orjson.dumps({"jsonrpc": "2.0", "id": ctx.request_id, "result": result}))


def make_stage():
    policy = MCPToolPolicySpec.model_validate({"budget": {"totalTokens": 20000}})
    shared = SharedState(server_name="srv")
    return budget.build(policy, shared), shared.stage_state[state.BUDGET]


def call():
    return CallContext(method="tools/call", request_id=1, params={"name": "read", "arguments": {}}, raw=b"",
                       headers={}, session_id="s1", caller=Caller(subject="alice", issuer="iss"))


async def test_session_end_forgets_the_budget_and_errors_cost_nothing():
    stage, state = make_stage()
    await stage(call(), upstream)
    assert state.local.ledger_count() == 1
    # As the chain hands it over: authenticated, as every request of the session.
    end = CallContext(method="", request_id=None, params={}, raw=b"", headers={}, session_id="s1", kind="session-end",
                      caller=Caller(subject="alice", issuer="iss"))

    async def accepted(ctx):
        return Outcome(status=200)

    await stage(end, accepted)
    assert state.local.ledger_count() == 0

    async def error(ctx):
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "error": {"code": -32603, "message": "x"}})

    outcome = await stage(call(), error)
    assert "error" in outcome.message
    assert await state.local.ledger_used(budget.budget_key(call())) == 0
