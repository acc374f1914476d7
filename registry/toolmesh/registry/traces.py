"""The OTLP/HTTP traces receiver: per-tool RED figures (rate, errors, p50/p95) from sidecar spans, with an optional relay."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Status

log = logging.getLogger("toolmesh.registry")

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


@dataclass(slots=True)
class _Calls:
    """Recent calls of one tool: (end time, duration ms, failed)."""

    samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))
    total: int = 0
    errors: int = 0


@dataclass(frozen=True, slots=True)
class ToolCallSpan:
    server: str
    tool: str
    duration_ms: float
    failed: bool


def tool_call_spans(request: ExportTraceServiceRequest) -> Iterator[ToolCallSpan]:
    """The `tools/call` spans of an export, with the server each came from (MCP semantic conventions)."""
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        server = resource.get("toolmesh.server.name") or str(resource.get("service.name", "")).rpartition("/")[2]
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attrs = _attributes(span.attributes)
                if attrs.get("mcp.method.name") != "tools/call":
                    continue
                tool = attrs.get("gen_ai.tool.name") or span.name.partition(" ")[2]
                if not server or not tool:
                    continue
                failed = span.status.code == Status.STATUS_CODE_ERROR or "error.type" in attrs
                duration = max(0, span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
                yield ToolCallSpan(str(server), str(tool), duration, failed)


def _attributes(attributes: Any) -> dict[str, Any]:
    out = {}
    for kv in attributes:
        which = kv.value.WhichOneof("value")
        if which in ("string_value", "int_value", "double_value", "bool_value"):
            out[kv.key] = getattr(kv.value, which)
    return out


class RedFigures:
    """Rate, errors and duration per (server, tool) over a sliding window.

    Spans come from anyone who can reach `/v1/traces`, so only (server, tool)
    pairs `known` accepts (the catalogue's) are kept: made-up names never
    grow the table.
    """

    def __init__(self, window: float = 300.0, clock=time.monotonic,
                 known: Callable[[str, str], bool] = lambda server, tool: True) -> None:
        self.window = window
        self._clock = clock
        self._known = known
        self._calls: dict[tuple[str, str], _Calls] = {}

    def __len__(self) -> int:
        """(server, tool) pairs with figures."""
        return len(self._calls)

    def record(self, span: ToolCallSpan) -> None:
        calls = self._calls.get((span.server, span.tool))
        if calls is None:
            if not self._known(span.server, span.tool):
                return
            calls = self._calls[(span.server, span.tool)] = _Calls()
        calls.samples.append((self._clock(), span.duration_ms, span.failed))
        calls.total += 1
        calls.errors += span.failed

    def figures(self, server: str, tool: str) -> dict[str, Any] | None:
        calls = self._calls.get((server, tool))
        if calls is None:
            return None
        since = self._clock() - self.window
        while calls.samples and calls.samples[0][0] < since:
            calls.samples.popleft()
        recent = list(calls.samples)
        durations = sorted(d for _, d, _ in recent)
        errors = sum(1 for *_, failed in recent if failed)
        return {
            "ratePerMinute": round(len(recent) * 60 / self.window, 3),
            "windowSeconds": self.window,
            "calls": len(recent),
            "errors": errors,
            "errorRate": round(errors / len(recent), 4) if recent else 0.0,
            "p50Ms": round(_quantile(durations, 0.50), 3),
            "p95Ms": round(_quantile(durations, 0.95), 3),
            "totalCalls": calls.total,
            "totalErrors": calls.errors,
        }


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class TraceReceiver:
    """`POST /v1/traces` (protobuf or JSON); `POST /v1/metrics` is accepted and dropped (the sidecars export both)."""

    def __init__(self, red: RedFigures, relay: str | None = None) -> None:
        self.red = red
        self.relay = relay.rstrip("/") if relay else None
        self._http: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task] = set()

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/traces", self.post_traces), web.post("/v1/metrics", self.post_metrics)]

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    async def post_traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        ctype = request.content_type
        export = ExportTraceServiceRequest()
        try:
            if ctype == JSON:
                json_format.Parse(body, export, ignore_unknown_fields=True)
            else:
                export.ParseFromString(body)
        except (DecodeError, json_format.ParseError, ValueError) as exc:
            return web.Response(status=400, text=f"not an OTLP trace export: {exc}")
        for span in tool_call_spans(export):
            self.red.record(span)
        if self.relay:
            self._forward(body, ctype)
        return _answer(ExportTraceServiceResponse(), ctype)

    async def post_metrics(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200, body=b"", content_type=PROTOBUF if request.content_type != JSON else JSON)

    def _forward(self, body: bytes, ctype: str) -> None:
        async def send() -> None:
            if self._http is None:
                self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            try:
                async with self._http.post(f"{self.relay}/v1/traces", data=body,
                                           headers={"Content-Type": ctype or PROTOBUF}) as resp:
                    if resp.status >= 300:
                        log.warning("OTLP relay to %s answered %d", self.relay, resp.status)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                log.warning("OTLP relay to %s failed: %s", self.relay, exc)

        task = asyncio.get_running_loop().create_task(send())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def _answer(message: ExportTraceServiceResponse, ctype: str) -> web.Response:
    if ctype == JSON:
        return web.Response(body=json_format.MessageToJson(message).encode(), content_type=JSON)
    return web.Response(body=message.SerializeToString(), content_type=PROTOBUF)
