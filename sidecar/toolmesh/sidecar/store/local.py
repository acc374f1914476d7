"""The in-process store: one replica's own memory, bounded, least recently used first out."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class LocalStore:
    """Token buckets and quota counts in this process, at most `max_keys` of each (a dropped bucket comes back full, a
    dropped count empty)."""

    name = "local"

    def __init__(self, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.max_keys = max_keys
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

    async def close(self) -> None:
        self._buckets.clear()
        self._quotas.clear()
