"""What tool results cost, per tool: bytes always, tokens and truncations when a budget counts them, in /metrics and
in the heartbeat's figures, which the registry sums over a server's instances."""

from __future__ import annotations

import orjson

from toolmesh.api.policy import MCPToolPolicySpec
from toolmesh.registry.http_api import _server_stats
from toolmesh.sidecar.chain import state
from toolmesh.sidecar.chain.frame import Caller, CallContext, Outcome, compose
from toolmesh.sidecar.chain.stages import budget, cache
from toolmesh.sidecar.chain.stages.observe import UNLISTED_TOOL, Observe
from toolmesh.sidecar.chain.stages.tokenizer import Tokenizer
from toolmesh.sidecar.chain.state import SharedState
from toolmesh.sidecar.control.heartbeat import _tool_stats
from toolmesh.sidecar.telemetry import Telemetry

TOOLS = [{"name": "read", "annotations": {"readOnlyHint": True}}, {"name": "write"}]
SHORT = "The quick brown fox jumps over the lazy dog."
LONG = " ".join(f"w{i}" for i in range(3000))


class Upstream:
    def __init__(self, text: str = SHORT):
        self.text = text
        self.calls = 0

    async def __call__(self, ctx: CallContext) -> Outcome:
        self.calls += 1
        return Outcome(raw=orjson.dumps({"jsonrpc": "2.0", "id": ctx.request_id,
                                         "result": {"content": [{"type": "text", "text": self.text}]}}))


def sidecar(spec: dict | None = None):
    shared = SharedState(server_name="srv", telemetry=Telemetry("srv", environ={}))
    shared.tools.update(TOOLS)
    policy = MCPToolPolicySpec.model_validate(spec or {})
    stages = [Observe(shared)]
    for module in (budget, cache):
        stage = module.build(policy, shared)
        if stage is not None:
            stages.append(stage)
    return shared, stages


def call(tool: str = "write", rid: int = 1) -> CallContext:
    return CallContext(method="tools/call", request_id=rid, params={"name": tool, "arguments": {}}, raw=b"",
                       headers={}, session_id="s1", caller=Caller(subject="alice", issuer="iss"))


def series(shared: SharedState, name: str, tool: str) -> list[float]:
    """[count, sum] of one tool's histogram."""
    histogram = getattr(shared.telemetry, name)
    counts = histogram.series.get((tool,))
    return [histogram.count(tool), counts[-1] if counts else 0.0]


async def test_without_a_budget_results_are_counted_in_bytes_only():
    shared, stages = sidecar()
    outcome = await compose(stages, Upstream())(call())
    size = len(outcome.body())
    assert series(shared, "result_bytes", "write") == [1, size]
    assert series(shared, "result_tokens", "write") == [0, 0]
    figures = _tool_stats(shared)["write"]
    assert figures["result_bytes_total"] == size
    assert "result_tokens_p50" not in figures and "truncations" not in figures


async def test_a_budget_counts_tokens_charged_and_truncations():
    shared, stages = sidecar({"budget": {"totalTokens": 20000, "reservedForResponse": 1000,
                                         "reservedForSystem": 1000}})
    handler = compose(stages, Upstream())
    first = await handler(call(rid=1))
    short_tokens = Tokenizer().count(SHORT)
    assert series(shared, "result_tokens", "write") == [1, short_tokens]
    long_handler = compose(stages, Upstream(LONG))
    second = await long_handler(call(rid=2))
    kept = orjson.loads(second.body())["result"]["_meta"][budget.META_KEY]["keptTokens"]
    assert series(shared, "result_tokens", "write") == [2, short_tokens + kept]
    assert series(shared, "result_bytes", "write") == [2, len(first.body()) + len(second.body())]
    figures = _tool_stats(shared)["write"]
    assert figures["truncations"] == 1
    assert figures["result_tokens_total"] == short_tokens + kept
    assert figures["result_tokens_p50"] == short_tokens and figures["result_tokens_p95"] == kept
    text = shared.telemetry.render_metrics()
    assert f'toolmesh_tool_result_tokens_count{{tool="write"}} 2' in text
    assert 'toolmesh_budget_truncations_total{tool="write"} 1' in text


async def test_errors_are_not_results_and_unlisted_tools_share_one_label():
    shared, stages = sidecar({"budget": {}})

    async def refuse(ctx: CallContext) -> Outcome:
        return Outcome(raw=orjson.dumps({"jsonrpc": "2.0", "id": ctx.request_id,
                                         "error": {"code": -32602, "message": "Unknown tool"}}))

    await compose(stages, refuse)(call())
    assert series(shared, "result_bytes", "write") == [0, 0]
    for n in range(50):
        await compose(stages, Upstream())(call(f"made-up-{n}"))
    assert shared.telemetry.result_bytes.series.keys() == {(UNLISTED_TOOL,)}
    assert series(shared, "result_tokens", UNLISTED_TOOL)[0] == 50


async def test_a_parsed_answer_is_serialised_once_and_the_client_gets_the_bytes_counted():
    shared, stages = sidecar()

    async def parsed(ctx: CallContext) -> Outcome:
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": {"content": []}})

    outcome = await compose(stages, parsed)(call())
    assert outcome.raw is not None
    assert series(shared, "result_bytes", "write") == [1, len(outcome.raw)]
    assert orjson.loads(outcome.raw) == outcome.message


async def test_cache_hits_reach_the_heartbeat_beside_the_hit_rate():
    shared, stages = sidecar({"cache": {}})
    upstream = Upstream()
    for rid in range(4):
        await compose(stages, upstream)(call("read", rid))
    assert upstream.calls == 1
    figures = _tool_stats(shared)["read"]
    assert figures["cache_hits"] == 3 and figures["cache_hit_rate"] == 0.75
    assert shared.stage_state[state.CACHE].stats()["hits"] == 3


def test_the_registry_sums_totals_over_instances_and_takes_percentiles_from_the_busiest():
    busy = {"count": 10, "errors": 1, "p95_ms": 5.0, "result_bytes_total": 1000, "result_tokens_total": 300,
            "result_tokens_p95": 40, "truncations": 2, "cache_hits": 4}
    quiet = {"count": 2, "errors": 0, "p95_ms": 9.0, "result_bytes_total": 50, "result_tokens_total": 20,
             "result_tokens_p95": 90, "truncations": 1, "cache_hits": 1}
    assert _server_stats([busy, quiet, None]) == {
        "count": 12, "errors": 1, "p95_ms": 5.0, "result_bytes_total": 1050, "result_tokens_total": 320,
        "result_tokens_p95": 40, "truncations": 3, "cache_hits": 5, "instances": 2}


async def test_made_up_tool_names_never_grow_the_budget_series():
    shared, stages = sidecar({"budget": {"totalTokens": 1000, "reservedForResponse": 0, "reservedForSystem": 0,
                                         "minAvailable": 990}})
    handler = compose(stages, Upstream(LONG))
    refused = 0
    for n in range(40):  # the first answers use the budget up; then each made-up name is refused
        outcome = await handler(call(f"made-up-{n}", rid=n))
        refused += b"budget" in (outcome.body() or b"").lower() and b'"isError":true' in (outcome.body() or b"")
    text = shared.telemetry.render_metrics()
    exhausted = [line for line in text.splitlines() if line.startswith("toolmesh_budget_exhausted_total{")]
    assert refused >= 30 and len(exhausted) == 1, exhausted
    assert exhausted[0].startswith('toolmesh_budget_exhausted_total{tool="_unlisted"} ')
    assert float(exhausted[0].rsplit(" ", 1)[1]) == refused
    assert "made-up" not in text
