"""The sidecar's telemetry: Prometheus metrics, OpenTelemetry tracing, per-tool figures for heartbeats, JSON logs.

Metrics registry API for stages (one `Telemetry` per process, at `shared.telemetry`):

    requests = shared.telemetry.metrics.counter(
        "toolmesh_cache_lookups_total", "Cache lookups by result.", ("tool", "result"))
    requests.inc("get_weather", "hit")            # label values in declaration order
    shared.telemetry.metrics.gauge("toolmesh_breaker_open", "1 while open.", ("tool",)).set(1, "flaky")
    shared.telemetry.metrics.histogram("toolmesh_retry_delay_seconds", "Waits.", ()).observe(0.2)

`counter`/`gauge`/`histogram` return the existing metric when called again with
the same name (so a stage rebuilt on a policy reload keeps its series).
`/metrics` renders them all in the Prometheus text format.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is
set, when the sidecar reports to a registry (spans then go to its OTLP
receiver), or when a span exporter is passed in. Otherwise `tracer` is None
and the observe stage does no tracing work at all. OTLP metrics go only to an
explicitly configured endpoint.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", '"': '\\"'})
MAX_SERIES = 5000
"""Label sets per metric; beyond this, new ones are folded into one "overflow" series (a client cannot grow memory)."""

EXPORT_SWITCH_INTERVAL = 0.0005
"""Seconds the interpreter lets one thread hold the GIL when another wants it, while spans are exported."""

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
"""Result tokens: from a one-line answer to more than a model's whole context window."""
BYTE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
"""Result bytes: 256 B … 16 MiB."""


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{str(v).translate(_LABEL_ESCAPES)}"' for n, v in zip(names, values))
    return "{" + pairs + "}"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str]):
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)

    def _key(self, values: tuple[str, ...], series: dict) -> tuple[str, ...]:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        if values in series or len(series) < MAX_SERIES:
            return values
        return ("overflow",) * len(values)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()):
        super().__init__(name, help_text, labelnames)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        values = self.values
        key = labels if labels in values else self._key(labels, values)
        values[key] = values.get(key, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in self.values.items()]


class Gauge(Counter):
    """A value that goes up and down per label set."""

    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        self.values[self._key(labels, self.values)] = value

    def dec(self, *labels: str, amount: float = 1.0) -> None:
        self.inc(*labels, amount=-amount)


class Histogram(_Metric):
    """Observations counted into cumulative buckets per label set."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = DURATION_BUCKETS):
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[tuple[str, ...], list[float]] = {}
        """label values -> per-bucket counts (not cumulative), then +Inf count, then sum."""

    def observe(self, value: float, *labels: str) -> None:
        series = self.series
        counts = series.get(labels)
        if counts is None:
            key = self._key(labels, series)
            counts = series.setdefault(key, [0.0] * (len(self.buckets) + 2))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        counts[-1] += value

    def count(self, *labels: str) -> float:
        counts = self.series.get(labels)
        return sum(counts[:-1]) if counts else 0.0

    def render(self) -> list[str]:
        lines = self.header()
        names = self.labelnames + ("le",)
        for key, counts in self.series.items():
            running = 0.0
            for bound, n in zip(self.buckets + (math.inf,), counts[:-1]):
                running += n
                lines.append(f"{self.name}_bucket{_labels(names, key + (_number(bound),))} {_number(running)}")
            label_text = _labels(self.labelnames, key)
            lines.append(f"{self.name}_sum{label_text} {_number(counts[-1])}")
            lines.append(f"{self.name}_count{label_text} {_number(running)}")
        return lines


class MetricsRegistry:
    """Every metric of the process, rendered together at /metrics."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _get(self, cls: type, name: str, help_text: str, labelnames: Sequence[str], **kw: Any) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = cls(name, help_text, labelnames, **kw)
        elif not isinstance(metric, cls) or metric.labelnames != tuple(labelnames):
            raise ValueError(f"metric {name} already registered as {metric.kind} with labels {metric.labelnames}")
        return metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._get(Counter, name, help_text, labelnames)

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._get(Gauge, name, help_text, labelnames)

    def histogram(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = DURATION_BUCKETS) -> Histogram:
        return self._get(Histogram, name, help_text, labelnames, buckets=buckets)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class ToolStats:
    """Per-tool call count, errors, recent durations (p50/p95 over the last `window` calls) and what results cost:
    bytes answered, tokens charged to a budget (p50/p95 over the last `window` results), truncations."""

    def __init__(self, window: int = 1024, max_tools: int = 1000):
        self._window = window
        self._max_tools = max_tools
        self._tools: dict[str, _ToolFigures] = {}

    def _entry(self, tool: str) -> _ToolFigures:
        entry = self._tools.get(tool)
        if entry is None:
            if len(self._tools) >= self._max_tools:
                tool = "overflow"
                entry = self._tools.get(tool)
            if entry is None:
                entry = self._tools[tool] = _ToolFigures(deque(maxlen=self._window))
        return entry

    def record(self, tool: str, seconds: float, error: bool) -> None:
        entry = self._entry(tool)
        entry.count += 1
        if error:
            entry.errors += 1
        entry.durations.append(seconds)

    def record_result(self, tool: str, size: int, tokens: int | None, truncated: bool) -> None:
        """One answered call's result: its bytes, and its tokens and truncation when a budget counted them."""
        entry = self._entry(tool)
        entry.result_bytes += size
        if tokens is not None:
            if entry.tokens is None:
                entry.tokens = deque(maxlen=self._window)
            entry.tokens.append(tokens)
            entry.tokens_total += tokens
        if truncated:
            entry.truncations += 1

    def snapshot(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for tool, entry in self._tools.items():
            ordered = sorted(entry.durations)
            figures: dict[str, float] = {
                "count": entry.count,
                "errors": entry.errors,
                "p50_ms": round(_percentile(ordered, 0.50) * 1000, 3),
                "p95_ms": round(_percentile(ordered, 0.95) * 1000, 3),
                "result_bytes_total": entry.result_bytes,
            }
            if entry.tokens is not None:
                # Only a sidecar with a budget counts tokens: without one, no figure rather than a false zero.
                tokens = sorted(entry.tokens)
                figures.update(result_tokens_p50=_percentile(tokens, 0.50), result_tokens_p95=_percentile(tokens, 0.95),
                               result_tokens_total=entry.tokens_total, truncations=entry.truncations)
            out[tool] = figures
        return out


@dataclass(slots=True)
class _ToolFigures:
    durations: deque[float]
    count: int = 0
    errors: int = 0
    result_bytes: int = 0
    tokens: deque[int] | None = None
    """Tokens of recent results, None until a budget counted one."""
    tokens_total: int = 0
    truncations: int = 0


def _percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


KNOWN_METHODS = frozenset({
    "initialize", "ping", "tools/list", "tools/call", "resources/list", "resources/read", "resources/templates/list",
    "resources/subscribe", "resources/unsubscribe", "prompts/list", "prompts/get", "completion/complete",
    "logging/setLevel", "server/discover", "subscriptions/listen", "notifications/initialized",
    "notifications/cancelled", "notifications/progress", "notifications/roots/list_changed",
    "tasks/get", "tasks/result", "tasks/list", "tasks/cancel",
})


def metric_method(method: str) -> str:
    """The method as a metric label: known MCP methods as is, anything else folded (label sets stay bounded)."""
    return method if method in KNOWN_METHODS else "other"


class Telemetry:
    """Metrics, tracer and per-tool figures of one sidecar process."""

    def __init__(self, server_name: str, *, network_transport: str = "tcp", span_exporter: Any = None,
                 metric_reader: Any = None, environ: Mapping[str, str] | None = None,
                 default_traces_endpoint: str | None = None):
        self.server_name = server_name
        self.network_transport = network_transport
        """`network.transport` of the upstream hop: "tcp" for HTTP upstreams, "pipe" for stdio."""
        self.metrics = MetricsRegistry()
        self.requests = self.metrics.counter(
            "toolmesh_requests_total", "MCP messages handled, by method, tool and outcome (ok, error, tool_error).",
            ("method", "tool", "outcome"))
        self.durations = self.metrics.histogram(
            "mcp_server_operation_duration_seconds", "Time from receiving an MCP request to answering it.",
            ("method", "tool"))
        self.in_flight = self.metrics.gauge("toolmesh_requests_in_flight", "MCP requests being handled now.")
        self.upstream_up = self.metrics.gauge("toolmesh_upstream_up", "1 while the upstream answers readiness probes.")
        self.probes = self.metrics.counter("toolmesh_upstream_probes_total", "Readiness probes of the upstream, by result.",
                                           ("result",))
        self.result_bytes = self.metrics.histogram(
            "toolmesh_tool_result_bytes", "Bytes of tools/call results answered (JSON-RPC response), by tool.",
            ("tool",), buckets=BYTE_BUCKETS)
        self.result_tokens = self.metrics.histogram(
            "toolmesh_tool_result_tokens", "Tokens of tools/call results charged to the caller's context budget, by tool.",
            ("tool",), buckets=TOKEN_BUCKETS)
        self.tools = ToolStats()
        self.tracer: Any = None
        self._tracer_provider: Any = None
        self._meter_provider: Any = None
        self.otel_duration: Any = None
        env = os.environ if environ is None else environ
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if span_exporter is None and not endpoint and default_traces_endpoint:
            # No collector configured: spans go to the registry's OTLP receiver (ARCHITECTURE.md, Traces).
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter(endpoint=default_traces_endpoint)
        if span_exporter is not None or endpoint:
            self._start_tracing(span_exporter)
        if metric_reader is not None or endpoint:
            self._start_metrics(metric_reader)

    def _resource(self):
        from opentelemetry.sdk.resources import Resource

        return Resource.create({"service.name": f"toolmesh-sidecar/{self.server_name}",
                                "toolmesh.server.name": self.server_name})

    def _start_tracing(self, exporter: Any) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider = TracerProvider(resource=self._resource())
        provider.add_span_processor(BatchSpanProcessor(exporter))
        # The processor encodes and sends batches on its own thread, holding the GIL while it encodes; with the
        # default 5 ms switch interval a call arriving meanwhile waits up to 5 ms per switch (p99 11 ms at one
        # connection). A 0.5 ms interval keeps that wait short: measured p99 4 ms, p50 unchanged.
        sys.setswitchinterval(min(sys.getswitchinterval(), EXPORT_SWITCH_INTERVAL))
        self._tracer_provider = provider
        self.tracer = provider.get_tracer("toolmesh.sidecar")

    def _start_metrics(self, reader: Any) -> None:
        from opentelemetry.sdk.metrics import MeterProvider

        if reader is None:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        provider = MeterProvider(metric_readers=[reader], resource=self._resource())
        self._meter_provider = provider
        meter = provider.get_meter("toolmesh.sidecar")
        self.otel_duration = meter.create_histogram(
            "mcp.server.operation.duration", unit="s", description="Duration of MCP requests as the sidecar served them.")

    def record(self, method: str, tool: str | None, outcome: str, seconds: float, attributes: dict | None = None) -> None:
        """One finished request: Prometheus series, per-tool figures and the OTel histogram."""
        label_method = metric_method(method)
        label_tool = tool or ""
        self.requests.inc(label_method, label_tool, outcome)
        self.durations.observe(seconds, label_method, label_tool)
        if tool is not None:
            self.tools.record(tool, seconds, outcome != "ok")
        if self.otel_duration is not None:
            self.otel_duration.record(seconds, attributes or {"mcp.method.name": method})

    def record_result(self, tool: str, size: int, tokens: int | None = None, truncated: bool = False) -> None:
        """One tools/call answered with a result: its size in bytes, and in tokens when a budget counted them."""
        self.result_bytes.observe(size, tool)
        if tokens is not None:
            self.result_tokens.observe(tokens, tool)
        self.tools.record_result(tool, size, tokens, truncated)

    def tool_stats(self) -> dict[str, dict[str, float]]:
        """Per tool: count, errors, p50_ms, p95_ms, result_bytes_total; with a budget also result_tokens_p50,
        result_tokens_p95, result_tokens_total and truncations (for heartbeats)."""
        return self.tools.snapshot()

    def render_metrics(self) -> str:
        return self.metrics.render()

    def shutdown(self) -> None:
        """Flush and stop exporters (spans still queued are sent)."""
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()


# --- JSON logs ---------------------------------------------------------------------------------

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every `extra` field (trace_id, request_id, ...)."""

    _second = -1
    _second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        # Every tool call is logged: the date and time are formatted once per second, not per line.
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        entry: dict[str, Any] = {
            "time": f"{self._second_text}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str = "INFO", stream: Any = None) -> None:
    """Send toolmesh's logs to stderr as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("toolmesh").setLevel(level.upper())
    # The lines name no source file or function: skip the stack walk that finds them (the logging
    # documentation's own optimisation), a few microseconds of every call's log line.
    logging._srcfile = None


def iter_lines(text: str) -> Iterable[dict[str, Any]]:
    """Parse JSON log lines (tests and tools read the sidecar's log with it)."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
