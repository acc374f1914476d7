"""Prometheus series of the policy stages, registered on the sidecar's telemetry or silently dropped without one."""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

UNLISTED_TOOL = "_unlisted"
"""The `tool` label of a call to a tool the upstream never listed: names a caller makes up must not grow the series."""


def tool_label(tool: str | None, listed: Container[str] | None) -> str:
    """A tool's metric label: its name when the upstream listed it, else `UNLISTED_TOOL`."""
    return tool if tool is not None and listed is not None and tool in listed else UNLISTED_TOOL


class _Discard:
    """Stands in for a metric when the sidecar runs without telemetry (unit tests, embedded use)."""

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        return None

    def set(self, value: float, *labels: str) -> None:
        return None

    def observe(self, value: float, *labels: str) -> None:
        return None


_DISCARD = _Discard()


def counter(shared: Any, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Any:
    registry = getattr(getattr(shared, "telemetry", None), "metrics", None)
    return registry.counter(name, help_text, labelnames) if registry is not None else _DISCARD


def gauge(shared: Any, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Any:
    registry = getattr(getattr(shared, "telemetry", None), "metrics", None)
    return registry.gauge(name, help_text, labelnames) if registry is not None else _DISCARD


def histogram(shared: Any, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Any:
    registry = getattr(getattr(shared, "telemetry", None), "metrics", None)
    return registry.histogram(name, help_text, labelnames) if registry is not None else _DISCARD
