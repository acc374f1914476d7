"""The in-process store: one replica's own memory, bounded, least recently used first out."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class LocalStore:
    """Token buckets in this process, at most `max_keys` (a dropped bucket comes back full)."""

    name = "local"

    def __init__(self, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.max_keys = max_keys
        self._clock = clock
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

    async def close(self) -> None:
        self._buckets.clear()
