"""The in-process store: one replica's own memory, bounded, least recently used first out."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from toolmesh.sidecar.store.base import StoredPage

DEFAULT_MAX_RESULTS = 1000
"""Most stored results."""
DEFAULT_MAX_RESULT_BYTES = 64 * 1024 * 1024
"""Most bytes of stored result text (UTF-8)."""


@dataclass(slots=True)
class _Stored:
    owner: str
    pages: list[str]
    tokens: int
    size: int
    expires_at: float


class LocalStore:
    """Token buckets and quota counts in this process, at most `max_keys` of each (a dropped bucket comes back full, a
    dropped count empty)."""

    name = "local"

    def __init__(self, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, *, max_results: int = DEFAULT_MAX_RESULTS,
                 max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES):
        self.max_keys = max_keys
        self.max_results = max_results
        self.max_result_bytes = max_result_bytes
        # conversation → [tokens spent, expiry on `clock`]
        self._ledgers: OrderedDict[str, list[float]] = OrderedDict()
        # result id → its pages; entries in the order stored, so the oldest leave first
        self._results: OrderedDict[str, _Stored] = OrderedDict()
        self.result_bytes = 0
        self._clock = clock
        self._wall = wall
        # key → [start of its window, used in it]; quota windows are aligned to the wall clock.
        self._quotas: OrderedDict[Hashable, list[float]] = OrderedDict()
        # key → [tokens, last refill time]; a list so the hot path mutates in place.
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()
        self.evictions = 0
        """Buckets dropped to stay under `max_keys`."""

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable, rate: float, burst: int) -> float:
        """`take_token` without the coroutine: the rate-limit stage's hot path calls this directly."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(burst), now]
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
                self.evictions += 1
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(float(burst), bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / rate

    async def take_token(self, key: Hashable, rate: float, burst: int) -> float:
        return self.take(key, rate, burst)

    def _window(self, key: Hashable, window: int) -> tuple[list[float], float]:
        now = self._wall()
        start = now - now % window
        entry = self._quotas.get(key)
        if entry is None or entry[0] != start:
            entry = self._quotas[key] = [start, 0.0]
            while len(self._quotas) > self.max_keys:
                self._quotas.popitem(last=False)
        else:
            self._quotas.move_to_end(key)
        return entry, start + window - now

    async def take_quota(self, key: Hashable, window: int, limit: int, amount: int) -> tuple[bool, float]:
        entry, reset = self._window(key, window)
        if entry[1] + max(amount, 1) > limit:
            return False, reset
        entry[1] += amount
        return True, reset

    async def add_quota(self, key: Hashable, window: int, amount: int) -> None:
        entry, _ = self._window(key, window)
        entry[1] += amount

    # -- conversations (ConversationStore) --

    def ledger_count(self) -> int:
        return len(self._ledgers)

    async def ledger_used(self, key: str) -> int:
        entry = self._ledgers.get(key)
        if entry is None:
            return 0
        if entry[1] <= self._clock():
            del self._ledgers[key]
            return 0
        return int(entry[0])

    async def ledger_charge(self, key: str, tokens: int, ttl: float) -> int:
        return self.charge(key, tokens, ttl)

    def ledger_charge_soon(self, key: str, tokens: int, ttl: float) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.charge(key, tokens, ttl))
        return future

    def charge(self, key: str, tokens: int, ttl: float) -> int:
        """`ledger_charge` without the coroutine, for the budget stage's own ledgers."""
        now = self._clock()
        while self._ledgers:  # in the order last charged, so (one ttl per policy) the expired ones lead
            oldest = next(iter(self._ledgers.values()))
            if oldest[1] > now:
                break
            self._ledgers.popitem(last=False)
        entry = self._ledgers.get(key)
        if entry is None or entry[1] <= now:
            entry = self._ledgers[key] = [0, now + ttl]
            self._ledgers.move_to_end(key)
            while len(self._ledgers) > self.max_keys:
                self._ledgers.popitem(last=False)
        else:
            self._ledgers.move_to_end(key)
        entry[0] += tokens
        entry[1] = now + ttl
        return int(entry[0])

    async def ledger_forget(self, key: str) -> None:
        self._ledgers.pop(key, None)

    async def put_result(self, result_id: str, owner: str, pages: list[str], tokens: int, ttl: float) -> None:
        now = self._clock()
        while self._results:  # one ttl per store in practice: the expired ones are at the front
            oldest_id, oldest = next(iter(self._results.items()))
            if oldest.expires_at > now:
                break
            self._drop_result(oldest_id)
        size = sum(len(p.encode()) for p in pages)
        self._results[result_id] = _Stored(owner, pages, tokens, size, now + ttl)
        self.result_bytes += size
        while self._results and (len(self._results) > self.max_results or self.result_bytes > self.max_result_bytes):
            self._drop_result(next(iter(self._results)))

    async def read_result(self, result_id: str, owner: str, number: int) -> StoredPage | None:
        stored = self._results.get(result_id)
        if stored is None:
            return None
        if stored.expires_at <= self._clock():
            self._drop_result(result_id)
            return None
        if not secrets.compare_digest(stored.owner.encode(), owner.encode()) or not 1 <= number <= len(stored.pages):
            return None
        return StoredPage(stored.pages[number - 1], len(stored.pages), stored.tokens)

    def _drop_result(self, result_id: str) -> None:
        self.result_bytes -= self._results.pop(result_id).size

    async def close(self) -> None:
        self._buckets.clear()
        self._quotas.clear()
        self._ledgers.clear()
        self._results.clear()
        self.result_bytes = 0
