"""The contract of a shared store, and what a stage does when the store cannot answer."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Protocol

log = logging.getLogger("toolmesh.sidecar.store")


class StoreUnavailable(Exception):
    """The store did not answer (down, restarting, unreachable, timed out); the stage decides what that means."""


class SharedStore(Protocol):
    """State every replica of one server reads and writes atomically; keys are scoped to the server by the store."""

    name: str
    """"local" or "redis", for metrics and logs."""

    async def take_token(self, key: Hashable, rate: float, burst: int) -> float:
        """Take one token from the bucket `key` (refilled at `rate` per second up to `burst`): 0.0 when granted,
        else the seconds until one is available. Raises StoreUnavailable."""

    async def close(self) -> None:
        """Release connections."""
