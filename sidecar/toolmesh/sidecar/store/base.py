"""The contract of a shared store, and what a stage does when the store cannot answer."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Hashable
from typing import Any, NamedTuple, Protocol

from toolmesh.sidecar.errors import StoreUnavailableError

log = logging.getLogger("toolmesh.sidecar.store")


class StoreUnavailable(Exception):
    """The store did not answer (down, restarting, unreachable, timed out); the stage decides what that means."""


def store_failed(decision: str, who: str, whose: str, exc: StoreUnavailable, errors: Any) -> None:
    """A section's `onStoreError` when the store did not answer: counted in `errors` and logged either way; `deny`
    refuses the call (503), `allow` returns and the section lets the call through uncounted."""
    errors.inc()
    if decision == "deny":
        log.warning("%s refused a call: the shared store did not answer (%s)", who, exc)
        raise StoreUnavailableError(f"the {whose} shared store did not answer and onStoreError is deny: "
                                    "retry shortly") from None
    log.warning("%s let a call through uncounted: the shared store did not answer (%s)", who, exc)


class SharedStore(Protocol):
    """State every replica of one server reads and writes atomically; keys are scoped to the server by the store."""

    name: str
    """"local" or "redis", for metrics and logs."""

    async def take_token(self, key: Hashable, rate: float, burst: int) -> float:
        """Take one token from the bucket `key` (refilled at `rate` per second up to `burst`): 0.0 when granted,
        else the seconds until one is available. Raises StoreUnavailable."""

    async def take_quota(self, key: Hashable, window: int, limit: int, amount: int) -> tuple[bool, float]:
        """Add `amount` to what `key` used in the current `window` (seconds, aligned to the clock) if that stays
        within `limit`; with `amount` 0, only whether anything is left. (granted, seconds until the window resets).
        Raises StoreUnavailable."""

    async def add_quota(self, key: Hashable, window: int, amount: int) -> None:
        """Add `amount` (negative to give back) to what `key` used in the current window, whatever the limit."""

    async def close(self) -> None:
        """Release connections."""


def digest(text: str) -> str:
    """How a shared store names a subject-bearing key or an owner: a digest, so the store's data names nobody."""
    return hashlib.sha256(text.encode()).hexdigest()


class StoredPage(NamedTuple):
    """One page of a stored result, as the store hands it back."""

    text: str
    count: int
    """Pages in all."""
    tokens: int
    """Tokens in the whole result."""


class ConversationStore(Protocol):
    """A conversation's ledger and its truncated results' pages, shared by every server and replica it reaches.

    Keys are chosen by the budget stage and always carry the verified subject; the store scopes them to its
    namespace (never to one server: a conversation spans servers)."""

    name: str

    async def ledger_used(self, key: str) -> int:
        """Tokens the conversation `key` has spent (0 for one never seen or expired). Raises StoreUnavailable."""

    async def ledger_charge(self, key: str, tokens: int, ttl: float) -> int:
        """Add `tokens` to the conversation `key`, which then lives `ttl` seconds more; returns what it has spent
        in all. Raises StoreUnavailable."""

    def ledger_charge_soon(self, key: str, tokens: int, ttl: float) -> Awaitable[Any]:
        """`ledger_charge` sent now, for a caller that need not wait: its outcome in the returned future."""

    async def ledger_forget(self, key: str) -> None:
        """Drop the conversation `key` (its session ended)."""

    async def put_result(self, result_id: str, owner: str, pages: list[str], tokens: int, ttl: float) -> None:
        """Keep a truncated result's pages under `result_id` for `ttl` seconds, readable by `owner` only."""

    async def read_result(self, result_id: str, owner: str, number: int) -> StoredPage | None:
        """Page `number` (1-based) of a stored result, or None: unknown, expired, out of range, or not `owner`'s."""
