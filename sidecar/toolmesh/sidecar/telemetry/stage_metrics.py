"""Prometheus series of the policy stages, registered on the sidecar's telemetry or silently dropped without one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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
