"""The Redis store's pipelined connection against a real redis-server: concurrent commands answered exactly and
in order, and a server that dies, stalls or restarts costs a clear failure within the timeout, never a hang."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from helpers.redis_server import redis_server
from toolmesh.sidecar.store.base import StoreUnavailable
from toolmesh.sidecar.store.redis_store import RedisStore

pytestmark = pytest.mark.timeout(60)
TIMEOUT = 0.5


@pytest.fixture
async def served(tmp_path):
    """A real redis-server and the store on it, closed after the test: (server, store)."""
    with redis_server(tmp_path / "redis") as redis:
        store = RedisStore(redis.url, "ns", "srv", timeout=TIMEOUT)
        try:
            yield redis, store
        finally:
            await store.close()


async def test_a_thousand_concurrent_charges_are_each_answered_and_none_is_lost(served):
    _, store = served
    totals = await asyncio.gather(*(store.ledger_charge("conversation", 1, ttl=60) for _ in range(1000)))
    # Each reply is its own command's: a thousand distinct running totals, the last one 1000.
    assert sorted(totals) == list(range(1, 1001))
    assert await store.ledger_used("conversation") == 1000
    waits = await asyncio.gather(*(store.take_token(("subject", n % 10), 0.001, 5) for n in range(100)))
    assert sum(1 for w in waits if w == 0.0) == 50  # a burst of 5 for each of 10 subjects
    for _ in range(300):  # charges nobody waits for still land
        store.ledger_charge_soon("later", 2, ttl=60)
    assert await store.ledger_charge("later", 0, ttl=60) == 600


async def test_a_killed_server_fails_what_is_in_flight_and_a_restarted_one_serves_again(served):
    redis, store = served
    assert await store.take_token("s", 1.0, 3) == 0.0
    in_flight = [asyncio.ensure_future(store.ledger_charge("c", 1, ttl=60)) for _ in range(50)]
    redis.kill()
    outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
    assert all(isinstance(o, (int, StoreUnavailable)) for o in outcomes), outcomes
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unix://"):
        await store.take_token("s", 1.0, 3)
    assert time.monotonic() - started < TIMEOUT * 2
    redis.start()  # empty: the scripts must be loaded again (NOSCRIPT) and the call sent again
    assert await store.take_token("s", 1.0, 3) == 0.0
    assert await store.ledger_charge("c2", 5, ttl=60) == 5


async def test_a_stalled_server_costs_the_timeout_not_a_hang_and_recovers(served):
    redis, store = served
    assert await store.ledger_charge("c", 1, ttl=60) == 1
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(*(store.ledger_used("c") for _ in range(20)), return_exceptions=True)
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        assert time.monotonic() - started < TIMEOUT * 4
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    # The stalled connection is dropped (its late replies would answer the wrong commands): a new one.
    assert await store.ledger_charge("c", 1, ttl=60) == 2


async def test_closing_with_commands_in_flight_ends_at_once(served):
    _, store = served
    await store.take_token("s", 1.0, 3)
    pending = [store.ledger_charge_soon("c", 1, ttl=60) for _ in range(200)]
    started = time.monotonic()
    await store.close()  # the fixture's close after it finds nothing left to do
    assert time.monotonic() - started < 1.0
    await asyncio.sleep(0)
    assert all(f.done() for f in pending)
    for f in pending:  # answered, or failed because the store closed
        assert f.cancelled() or f.exception() is None or "closing" in str(f.exception())
