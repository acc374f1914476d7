"""The registry's OTLP receiver fed by the real OpenTelemetry SDK exporter, and by a real sidecar's spans."""

from __future__ import annotations

import asyncio
import subprocess

import aiohttp
import orjson
from mcp.client import Client
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

from helpers import TOOLMESH, async_wait_until
from helpers.registry_procs import beating, get_json, registry_process, toy_server
from helpers.sidecar import sidecar

TOOLS = [{"name": "echo", "inputSchema": {"type": "object"}}, {"name": "other", "inputSchema": {"type": "object"}}]


def export_calls(registry: str, server: str, calls: list[tuple[str, bool]]) -> None:
    """Spans as a sidecar makes them (MCP semantic conventions), sent by the SDK's OTLP/HTTP exporter."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"toolmesh-sidecar/{server}",
                                                        "toolmesh.server.name": server}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{registry}/v1/traces")))
    tracer = provider.get_tracer("test")
    for tool, failed in calls:
        with tracer.start_as_current_span(f"tools/call {tool}") as span:
            span.set_attribute("mcp.method.name", "tools/call")
            span.set_attribute("gen_ai.tool.name", tool)
            if failed:
                span.set_attribute("error.type", "tool_error")
                span.set_status(Status(StatusCode.ERROR))
        with tracer.start_as_current_span("tools/list"):
            pass
    provider.shutdown()


async def red_of(registry: str, name: str):
    tools = {t["name"]: t for t in (await get_json(f"{registry}/v1/tools"))["tools"]}
    return tools[name]["red"]


async def test_spans_from_the_sdk_exporter_become_red_figures_and_are_relayed(tmp_path):
    with registry_process(tmp_path) as collector, \
            registry_process(tmp_path, extra=["--otlp-relay", collector]) as registry:
        beat = {"server": "alpha", "endpoint": "http://127.0.0.1:1/mcp", "tools": TOOLS}
        async with beating(registry, beat), beating(collector, beat):
            assert await red_of(registry, "alpha__echo") is None
            await asyncio.to_thread(export_calls, registry, "alpha",
                                    [("echo", False), ("echo", False), ("echo", True), ("other", False)])
            red = await red_of(registry, "alpha__echo")
            assert red["calls"] == 3 and red["errors"] == 1 and red["errorRate"] == round(1 / 3, 4)
            assert red["p95Ms"] >= red["p50Ms"] >= 0 and red["ratePerMinute"] > 0
            assert (await red_of(registry, "alpha__other"))["calls"] == 1

            async def relayed():
                return (await red_of(collector, "alpha__echo") or {}).get("calls") == 3

            await async_wait_until(relayed, timeout=10, what="the relay to pass the spans on")


async def test_otlp_json_is_accepted_and_garbage_refused(tmp_path):
    with registry_process(tmp_path) as registry:
        async with beating(registry, {"server": "alpha", "endpoint": "http://127.0.0.1:1/mcp", "tools": TOOLS}):
            export = {"resourceSpans": [{
                "resource": {"attributes": [{"key": "toolmesh.server.name", "value": {"stringValue": "alpha"}}]},
                "scopeSpans": [{"spans": [{
                    "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
                    "name": "tools/call echo", "startTimeUnixNano": "1000000", "endTimeUnixNano": "3000000",
                    "attributes": [{"key": "mcp.method.name", "value": {"stringValue": "tools/call"}},
                                   {"key": "gen_ai.tool.name", "value": {"stringValue": "echo"}}]}]}]}]}
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{registry}/v1/traces", data=orjson.dumps(export),
                                     headers={"Content-Type": "application/json"}) as resp:
                    assert resp.status == 200 and resp.content_type == "application/json"
                async with http.post(f"{registry}/v1/traces", data=b"\xff\x00garbage",
                                     headers={"Content-Type": "application/x-protobuf"}) as resp:
                    assert resp.status == 400
            red = await red_of(registry, "alpha__echo")
            assert red["calls"] == 1 and red["p50Ms"] == 2.0


async def test_a_sidecars_own_spans_reach_the_registry(tmp_path):
    with registry_process(tmp_path) as registry, toy_server(tmp_path, "alpha") as (_, upstream):
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": registry, "OTEL_BSP_SCHEDULE_DELAY": "50"}
        with sidecar(["--upstream", upstream], tmp_path, "--server-name", "alpha", "--registry", registry, env=env):
            async def listed():
                return any(t["name"] == "alpha__echo" for t in (await get_json(f"{registry}/v1/tools"))["tools"])

            await async_wait_until(listed, timeout=15, what="alpha listed")
            async with Client(f"{registry}/mcp", mode="legacy") as client:
                for i in range(3):
                    await client.call_tool("alpha__echo", {"message": str(i)})

            async def counted():
                return ((await red_of(registry, "alpha__echo")) or {}).get("calls") == 3

            await async_wait_until(counted, timeout=15, what="the sidecar's tools/call spans")
            listing = subprocess.run([TOOLMESH, "tools", f"{registry}/mcp", "--mode", "legacy"], capture_output=True,
                                     text=True, timeout=60)
            line = next(x for x in listing.stdout.splitlines() if x.startswith("alpha__echo"))
            assert "(3 calls, 0 errors, p50 " in line, listing.stdout + listing.stderr
