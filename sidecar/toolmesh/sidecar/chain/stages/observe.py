"""Observability, the chain's first stage: metrics and per-tool figures for every request, spans and trace propagation when tracing is on.

Spans follow the OpenTelemetry MCP semantic conventions: name
`{mcp.method.name} {gen_ai.tool.name}`, attributes `mcp.method.name`,
`gen_ai.tool.name`, `jsonrpc.request.id`, `mcp.session.id`,
`mcp.protocol.version`, `network.transport`, `error.type` (`tool_error` when a
tool result has `isError: true`). The caller's trace context is read from
`params._meta` (`traceparent`, `tracestate`), else from the W3C `traceparent`
and `tracestate` HTTP headers (`_meta` wins when both are sent, as MCP says), and
the sidecar's span context is written back to `_meta` for the upstream, which is
the only time params are re-serialised. Without a tracer none of that work is done.

Every `tools/call` answered with a result is counted by its size in bytes and, when the
policy has a budget (whose stage counts them with the tokenizer it loads anyway),
by the tokens charged and whether it was truncated.

Every `tools/call` is logged at INFO, one JSON line: tool, subject, outcome,
error type, duration, trace id, request id and the session as `session_ref`
(never the id). Other requests are logged at INFO when they fail, else at DEBUG.
"""

from __future__ import annotations

import logging
import time
from typing import Any, TYPE_CHECKING

import orjson

from toolmesh.api.sessions import session_ref
from toolmesh.sidecar.chain.frame import NOTIFICATION, REQUEST, CallContext, CallRecord, Handler, Outcome, derive
from toolmesh.sidecar.errors import ProxyError
from toolmesh.sidecar.chain.state import SharedState
from toolmesh.sidecar.telemetry import stage_metrics

if TYPE_CHECKING:
    from toolmesh.api.policy import MCPToolPolicySpec

log = logging.getLogger("toolmesh.sidecar.calls")

_TRACE_KEYS = ("traceparent", "tracestate")
def build(policy: MCPToolPolicySpec | None, shared: SharedState) -> Observe | None:
    """Observability is always on; it is the one stage that does not depend on the policy."""
    if shared.telemetry is None:
        return None
    return Observe(shared)


def _outcome_label(outcome: Outcome) -> tuple[str, str | None]:
    """("ok" | "error" | "tool_error", error.type) of an answer, parsing only small unparsed error-looking bodies."""
    message = outcome.message
    if message is None:
        raw = outcome.raw
        if raw is not None and len(raw) < 2048 and b'"error"' in raw:
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = None
            if type(parsed) is dict:
                message = parsed
        if message is None:
            return ("error", str(outcome.status)) if outcome.status >= 400 else ("ok", None)
    error = message.get("error")
    if error is not None:
        code = error.get("code") if isinstance(error, dict) else None
        return "error", str(code) if code is not None else "error"
    result = message.get("result")
    if isinstance(result, dict) and result.get("isError") is True:
        return "tool_error", "tool_error"
    if outcome.status >= 400:
        return "error", str(outcome.status)
    return "ok", None


UNLISTED_TOOL = stage_metrics.UNLISTED_TOOL


class Observe:
    """Counts, times and traces each request; never changes an answer."""

    def __init__(self, shared: SharedState):
        self.telemetry = shared.telemetry
        self.listed = shared.tools
        self.transport = getattr(self.telemetry, "network_transport", "tcp")
        self._propagator = None
        if self.telemetry.tracer is not None:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            self._propagator = TraceContextTextMapPropagator()

    async def __call__(self, ctx: CallContext, call_next: Handler) -> Outcome:
        kind = ctx.kind
        if kind != REQUEST:
            if kind == NOTIFICATION:
                self.telemetry.requests.inc("notification", "", "ok")
            return await call_next(ctx)
        if self.telemetry.tracer is not None:
            return await self._traced(ctx, call_next)
        telemetry = self.telemetry
        telemetry.in_flight.inc()
        started = time.perf_counter()
        seen = None
        try:
            if ctx.method == "tools/call":
                # Stages further in write here what the log line and the figures need: who the caller is
                # (authenticate), what the result cost the caller's budget (budget).
                seen = CallRecord()
                ctx = derive(ctx, record=seen)
            outcome = await call_next(ctx)
        except ProxyError as exc:
            self._finish(ctx, started, "error", str(exc.code), None, seen)
            raise
        except BaseException as exc:
            self._finish(ctx, started, "error", exc.__class__.__name__, None, seen)
            raise
        finally:
            telemetry.in_flight.dec()
        label, error_type = _outcome_label(outcome)
        self._finish(ctx, started, label, error_type, None, seen)
        if seen is not None and label != "error":
            outcome = self._record_result(ctx, outcome, seen)
        return outcome

    def _record_result(self, ctx: CallContext, outcome: Outcome, seen: CallRecord) -> Outcome:
        """Counts what a tools/call result costs: its bytes, and its tokens when a budget counted them."""
        body = outcome.body()
        if body is None:
            return outcome
        label = stage_metrics.tool_label(ctx.tool, self.listed)
        self.telemetry.record_result(label, len(body), seen.result_tokens, seen.truncated)
        if outcome.raw is None:
            # The client gets these very bytes: keep them, so the answer is not serialised a second time.
            return Outcome(message=outcome.message, raw=body, status=outcome.status, headers=outcome.headers,
                           event_id=outcome.event_id, streamed=outcome.streamed)
        return outcome

    def _finish(self, ctx: CallContext, started: float, label: str, error_type: str | None, trace_id: str | None,
                seen: CallRecord | None = None) -> None:
        seconds = time.perf_counter() - started
        tool = ctx.tool
        metric_tool = tool if tool is None or tool in self.listed else UNLISTED_TOOL
        attributes = None
        if self.telemetry.otel_duration is not None:
            attributes = {"mcp.method.name": ctx.method, "network.transport": self.transport}
            if metric_tool is not None:
                attributes["gen_ai.tool.name"] = metric_tool
            if error_type is not None:
                attributes["error.type"] = error_type
        self.telemetry.record(ctx.method, metric_tool, label, seconds, attributes)
        level = logging.INFO if label != "ok" or tool is not None else logging.DEBUG
        if log.isEnabledFor(level):
            if trace_id is None:
                trace_id = _incoming_trace_id(ctx)
            caller = seen.caller if seen is not None and seen.caller is not None else ctx.caller
            log.log(level, "%s %s", ctx.method, tool or "", extra={
                "event": "request", "method": ctx.method, "tool": tool,
                "subject": caller.subject if caller is not None else None, "request_id": ctx.request_id,
                "session_ref": session_ref(ctx.session_id), "trace_id": trace_id, "outcome": label, "error_type": error_type,
                "duration_ms": round(seconds * 1000, 3),
            })

    async def _traced(self, ctx: CallContext, call_next: Handler) -> Outcome:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        telemetry = self.telemetry
        params = ctx.params
        meta = params.get("_meta")
        meta = meta if isinstance(meta, dict) else {}
        carrier = {k: meta[k] for k in _TRACE_KEYS if isinstance(meta.get(k), str)}
        if "traceparent" not in carrier:
            # The W3C headers, when `_meta` carries no trace context (it wins when both are sent).
            carrier = {k: v for k in _TRACE_KEYS if (v := ctx.headers.get(k)) is not None}
        parent = self._propagator.extract(carrier) if carrier else None
        tool = ctx.tool
        attributes: dict[str, Any] = {"mcp.method.name": ctx.method, "network.transport": self.transport}
        if tool is not None:
            attributes["gen_ai.tool.name"] = tool
            attributes["gen_ai.operation.name"] = "execute_tool"
        if ctx.request_id is not None:
            attributes["jsonrpc.request.id"] = str(ctx.request_id)
        if ctx.session_id is not None:
            # Spans leave the pod: they name the session by a digest, never by the id that grants access to it.
            attributes["mcp.session.id"] = session_ref(ctx.session_id)
        if ctx.protocol_version is not None:
            attributes["mcp.protocol.version"] = ctx.protocol_version
        name = f"{ctx.method} {tool}" if tool else ctx.method
        telemetry.in_flight.inc()
        started = time.perf_counter()
        span = telemetry.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        trace_id = format(span.get_span_context().trace_id, "032x")
        try:
            # The upstream continues this trace: its spans become children of the sidecar's.
            outgoing: dict[str, str] = {}
            self._propagator.inject(outgoing, context=trace.set_span_in_context(span))
            ctx = derive(ctx, params={**params, "_meta": {**meta, **outgoing}}, params_changed=True)
            seen = None
            if ctx.method == "tools/call":
                seen = CallRecord()
                ctx = derive(ctx, record=seen)
            try:
                outcome = await call_next(ctx)
            except ProxyError as exc:
                span.set_attribute("error.type", str(exc.code))
                span.set_status(Status(StatusCode.ERROR, exc.message))
                self._finish(ctx, started, "error", str(exc.code), trace_id, seen)
                raise
            except BaseException as exc:
                span.set_attribute("error.type", exc.__class__.__name__)
                span.set_status(Status(StatusCode.ERROR, exc.__class__.__name__))
                self._finish(ctx, started, "error", exc.__class__.__name__, trace_id, seen)
                raise
            label, error_type = _outcome_label(outcome)
            if error_type is not None:
                span.set_attribute("error.type", error_type)
                span.set_status(Status(StatusCode.ERROR))
            self._finish(ctx, started, label, error_type, trace_id, seen)
            if seen is not None and label != "error":
                outcome = self._record_result(ctx, outcome, seen)
            return outcome
        finally:
            telemetry.in_flight.dec()
            span.end()


def _incoming_trace_id(ctx: CallContext) -> str | None:
    """The caller's trace id: from `params._meta.traceparent`, else from the `traceparent` header."""
    meta = ctx.params.get("_meta")
    parent = meta.get("traceparent") if isinstance(meta, dict) else None
    if not isinstance(parent, str):
        # The HTTP layer's headers are case-insensitive: one lookup, never a scan (this runs on every call).
        parent = ctx.headers.get("traceparent")
    if parent is not None and len(parent) >= 35:
        return parent[3:35]
    return None
