"""The chain frame: stage order, the error boundary, and the pipeline's atomic swap."""

from __future__ import annotations

import dataclasses

import pytest

from toolmesh.sidecar.chain.frame import Caller, CallContext, Outcome, compose, derive, run_chain
from toolmesh.sidecar.errors import ClientGone, RetryLater, UpstreamTimeout
from toolmesh.sidecar.chain.pipeline import Pipeline, build_stages, forward_headers
from toolmesh.sidecar.chain.state import SharedState
from toolmesh.sidecar.telemetry import MetricsRegistry, Telemetry, ToolStats


def ctx(method="tools/call", **kw) -> CallContext:
    params = kw.pop("params", {"name": "echo", "arguments": {}})
    return CallContext(method=method, request_id=1, params=params, raw=b"{}", headers={}, **kw)


class Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log

    async def __call__(self, c, call_next):
        self.log.append(f"{self.name}>")
        out = await call_next(dataclasses.replace(c, params={**c.params, self.name: True}, params_changed=True))
        self.log.append(f"<{self.name}")
        return out


async def test_compose_runs_outermost_first_and_passes_derived_contexts():
    log: list[str] = []

    async def terminal(c):
        log.append("upstream")
        return Outcome(message={"jsonrpc": "2.0", "id": c.request_id, "result": dict(c.params)})

    handler = compose([Recorder("a", log), Recorder("b", log)], terminal)
    outcome = await run_chain(handler, ctx())
    assert log == ["a>", "b>", "upstream", "<b", "<a"]
    assert outcome.message["result"]["a"] and outcome.message["result"]["b"]


async def test_boundary_turns_typed_errors_into_jsonrpc_errors_with_status():
    async def limited(c):
        raise RetryLater("slow down", retry_after=2.2)

    outcome = await run_chain(limited, ctx())
    assert outcome.status == 429 and outcome.headers["Retry-After"] == "3"
    assert outcome.message["id"] == 1 and outcome.message["error"]["code"] == -32005

    async def silent(c):
        raise UpstreamTimeout("late")

    assert (await run_chain(silent, ctx())).status == 504


async def test_boundary_hides_bugs_and_lets_client_disconnects_through():
    async def buggy(c):
        raise KeyError("secret detail")

    outcome = await run_chain(buggy, ctx())
    assert outcome.status == 500 and "secret" not in outcome.body().decode()

    async def gone(c):
        raise ClientGone()

    with pytest.raises(ClientGone):
        await run_chain(gone, ctx())


def test_outcome_body_prefers_raw_and_reports_tool_errors():
    assert Outcome(raw=b"x", message={"a": 1}).body() == b"x"
    assert Outcome(message={"id": 1, "result": {}}).body() == b'{"id":1,"result":{}}'
    assert Outcome(message={"result": {"isError": True}}).is_error
    assert not Outcome(raw=b"{}").is_error


def test_forward_headers_drop_hop_by_hop_and_keep_mcp_headers():
    sent = forward_headers({"Host": "a", "Connection": "keep-alive", "Mcp-Session-Id": "s", "Mcp-Param-X": "1",
                            "Origin": "http://localhost", "Content-Length": "3", "Accept": "*/*"})
    assert sent == {"Mcp-Session-Id": "s", "Mcp-Param-X": "1", "Accept": "*/*"}
    named = forward_headers({"Connection": "keep-alive, X-Hop", "X-Hop": "1", "X-End": "2"})
    assert named == {"X-End": "2"}


async def test_pipeline_swaps_atomically_and_notifies():
    shared = SharedState(server_name="s", telemetry=Telemetry("s", environ={}))

    async def terminal(c):
        return Outcome(raw=b"{}")

    pipeline = Pipeline(terminal, shared)
    first = pipeline.handler
    seen = []
    pipeline.on_swap(seen.append)
    pipeline.swap(None)
    assert pipeline.generation == 2 and seen == [None]
    assert pipeline.handler is not first
    assert [type(s).__name__ for s in build_stages(None, shared)][0] == "Observe"


def test_metrics_registry_renders_prometheus_text():
    registry = MetricsRegistry()
    counter = registry.counter("t_total", "Things.", ("tool",))
    counter.inc('we"ird')
    counter.inc('we"ird', amount=2)
    assert registry.counter("t_total", "Things.", ("tool",)) is counter
    hist = registry.histogram("d_seconds", "Durations.", (), buckets=(0.1, 1.0))
    hist.observe(0.05)
    hist.observe(0.5)
    text = registry.render()
    assert 't_total{tool="we\\"ird"} 3' in text
    assert 'd_seconds_bucket{le="0.1"} 1' in text and 'd_seconds_bucket{le="+Inf"} 2' in text
    assert "d_seconds_count 2" in text
    with pytest.raises(ValueError):
        registry.gauge("t_total", "again", ("tool",))


def test_tool_stats_percentiles():
    stats = ToolStats()
    for ms in range(1, 101):
        stats.record("echo", ms / 1000, error=ms > 95)
    snap = stats.snapshot()["echo"]
    assert snap == {"count": 100, "errors": 5, "p50_ms": 50.0, "p95_ms": 95.0, "result_bytes_total": 0}


def test_derive_is_replace_and_leaves_the_original_alone():
    original = ctx()
    derived = derive(original, caller=Caller("alice"), params_changed=True)
    assert derived == dataclasses.replace(original, caller=Caller("alice"), params_changed=True)
    assert derived.started == original.started and original.caller is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        derived.method = "x"
    with pytest.raises(TypeError):
        derive(original, no_such_field=1)
