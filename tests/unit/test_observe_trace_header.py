"""The observe stage continues the caller's trace from the W3C `traceparent` header when `_meta` has none."""

from __future__ import annotations

import orjson
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from toolmesh.sidecar.chain.frame import CallContext, Outcome
from toolmesh.sidecar.chain.stages.observe import Observe
from toolmesh.sidecar.chain.state import SharedState
from toolmesh.sidecar.telemetry import Telemetry

HEADER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
META = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def answer(ctx: CallContext) -> Outcome:
    return Outcome(raw=orjson.dumps({"jsonrpc": "2.0", "id": ctx.request_id, "result": {"content": []}}))


def call(meta: dict) -> CallContext:
    return CallContext(method="tools/call", request_id=1, params={"name": "echo", "arguments": {}, "_meta": meta},
                       raw=b"", headers={"traceparent": HEADER})


async def test_spans_continue_the_header_trace_and_meta_wins():
    exporter = InMemorySpanExporter()
    telemetry = Telemetry("srv", span_exporter=exporter, environ={})
    stage = Observe(SharedState(server_name="srv", telemetry=telemetry))
    await stage(call({}), answer)
    await stage(call({"traceparent": META}), answer)
    telemetry.shutdown()
    spans = exporter.get_finished_spans()
    assert [format(s.context.trace_id, "032x") for s in spans] == [HEADER[3:35], META[3:35]]
    assert format(spans[0].parent.span_id, "016x") == HEADER[36:52]
