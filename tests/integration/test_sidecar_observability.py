"""Spans per the MCP semantic conventions exported over OTLP/HTTP, trace context carried in params._meta, JSON logs."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web
from mcp import Client
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from helpers import async_wait_until, free_port
from helpers.mcp_servers import sdk_http_server
from helpers.sidecar import sidecar

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class OtlpReceiver:
    """A real OTLP/HTTP endpoint (protobuf) that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list = []
        self.metric_posts = 0

    async def traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def metrics(self, request: web.Request) -> web.Response:
        await request.read()
        self.metric_posts += 1
        return web.Response(body=b"", content_type="application/x-protobuf")

    def named(self, name: str) -> list:
        return [s for s in self.spans if s.name == name]


def attributes(span) -> dict:
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


@pytest.fixture
async def receiver():
    rec = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", rec.traces)
    app.router.add_post("/v1/metrics", rec.metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    rec.endpoint = f"http://127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


async def test_spans_exported_with_mcp_attributes_and_trace_context_in_meta(receiver, tmp_path):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_METRIC_EXPORT_INTERVAL": "200"}
    with sdk_http_server(log_path=tmp_path / "up.log") as url:
        with sidecar(["--upstream", url], tmp_path, "--log-level", "DEBUG", "--server-name", "clock", env=env,
                     wait_ready=False) as sc:
            await asyncio.to_thread(_wait_ready, sc.base)
            meta = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01", "tracestate": "vendor=1"}
            async with Client(sc.url, mode="legacy") as client:
                seen = (await client.call_tool("show_meta", {}, meta=meta)).structured_content
                await client.call_tool("fail", {})

            await async_wait_until(lambda: _has(receiver, "tools/call fail"), timeout=15, what="spans exported")
            await async_wait_until(lambda: _metrics_sent(receiver), timeout=15, what="OTLP metrics exported")
            log_text = sc.log()

    span = receiver.named("tools/call show_meta")[0]
    attrs = attributes(span)
    assert attrs["mcp.method.name"] == "tools/call"
    assert attrs["gen_ai.tool.name"] == "show_meta"
    assert attrs["mcp.protocol.version"] == "2025-11-25"
    assert attrs["mcp.session.id"]
    assert attrs["network.transport"] == "tcp"
    assert attrs["jsonrpc.request.id"]
    assert "error.type" not in attrs
    # The caller's trace continues through the sidecar...
    assert span.trace_id.hex() == TRACE_ID
    assert span.parent_span_id.hex() == PARENT_SPAN
    # ...and on to the upstream, whose request carries the sidecar's span as parent.
    assert seen["traceparent"] == f"00-{TRACE_ID}-{span.span_id.hex()}-01"
    assert seen["tracestate"] == "vendor=1"

    failed = attributes(receiver.named("tools/call fail")[0])
    assert failed["error.type"] == "tool_error"
    assert receiver.named("initialize")

    lines = [orjson.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    call_line = next(l for l in lines if l.get("event") == "request" and l.get("tool") == "show_meta")
    assert call_line["trace_id"] == TRACE_ID
    assert call_line["request_id"] is not None
    assert call_line["outcome"] == "ok"


async def test_untraced_calls_reach_the_upstream_byte_for_byte(tmp_path):
    """Without an exporter the sidecar does no tracing work and forwards _meta untouched."""
    with sdk_http_server(log_path=tmp_path / "up.log") as url:
        with sidecar(["--upstream", url], tmp_path) as sc:
            meta = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"}
            async with Client(sc.url, mode="legacy") as client:
                seen = (await client.call_tool("show_meta", {}, meta=meta)).structured_content
    assert seen["traceparent"] == f"00-{TRACE_ID}-{PARENT_SPAN}-01"


def _wait_ready(base: str) -> None:
    from helpers import wait_until
    from helpers.sidecar import ready

    wait_until(lambda: ready(base), timeout=20, what="sidecar ready")


async def _has(receiver: OtlpReceiver, name: str) -> bool:
    return bool(receiver.named(name))


async def _metrics_sent(receiver: OtlpReceiver) -> bool:
    return receiver.metric_posts > 0


async def test_spans_go_to_the_registry_when_no_collector_is_configured(receiver, tmp_path):
    with sdk_http_server(log_path=tmp_path / "up.log") as url:
        with sidecar(["--upstream", url], tmp_path, "--registry", receiver.endpoint, "--server-name", "clock",
                     env={"OTEL_BSP_SCHEDULE_DELAY": "50"}, wait_ready=False) as sc:
            await asyncio.to_thread(_wait_ready, sc.base)
            async with Client(sc.url, mode="legacy") as client:
                await client.call_tool("echo", {"text": "traced"})
            await async_wait_until(lambda: _has(receiver, "tools/call echo"), timeout=15, what="spans at the registry")
    assert attributes(receiver.named("tools/call echo")[0])["gen_ai.tool.name"] == "echo"
