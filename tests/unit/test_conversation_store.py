"""The conversation stores: in the process, and the SQLite file the sidecars of one machine share; and whose
conversation a call is charged to."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from toolmesh.sidecar.chain.frame import Caller, CallContext
from toolmesh.sidecar.chain.stages import budget
from toolmesh.sidecar.store.base import StoreUnavailable
from toolmesh.sidecar.store.local import LocalStore
from toolmesh.sidecar.store.sqlite_store import SqliteStore


def ctx(session: str | None = None, subject: str | None = "alice", **headers: str) -> CallContext:
    return CallContext(method="tools/call", request_id=1, params={"name": "t"}, raw=b"", headers=headers,
                       session_id=session, caller=Caller(subject=subject, issuer="iss") if subject else None)


def test_the_budget_key_names_the_conversation_and_always_the_subject():
    # The gateway's key wins over the sidecar session: every server of a gateway session shares one ledger.
    assert budget.budget_key(ctx("s1", **{"mcp-budget-key": "g"})) == budget.budget_key(ctx("s2", **{"mcp-budget-key": "g"}))
    assert budget.budget_key(ctx("s1")) != budget.budget_key(ctx("s2"))
    # Never another subject's, whatever key or session id they send.
    assert budget.budget_key(ctx(None, "bob", **{"mcp-budget-key": "g"})) != budget.budget_key(ctx(None, **{"mcp-budget-key": "g"}))
    assert budget.budget_key(ctx("s1", "bob")) != budget.budget_key(ctx("s1"))
    assert budget.budget_key(ctx("s1", None)) != budget.budget_key(ctx("s1"))
    assert budget.budget_key(ctx(None)) is None  # stateless, no key: budgeted alone


@pytest.fixture(params=["local", "sqlite"])
def store(request, tmp_path):
    now = [1000.0]
    if request.param == "local":
        made = LocalStore(clock=lambda: now[0], max_results=3)
    else:
        made = SqliteStore(tmp_path / "state.db", max_results=3, wall=lambda: now[0])
    made.now = now
    return made


async def test_a_ledger_adds_up_expires_and_is_forgotten(store):
    assert await store.ledger_used("c") == 0
    assert await store.ledger_charge("c", 100, ttl=10) == 100
    assert await store.ledger_charge("c", 50, ttl=10) == 150
    assert await store.ledger_used("c") == 150
    assert await store.ledger_used("other") == 0
    store.now[0] += 9
    assert await store.ledger_used("c") == 150  # reading does not keep it alive, charging does
    assert await store.ledger_charge("c", 1, ttl=10) == 151
    store.now[0] += 10.5
    assert await store.ledger_used("c") == 0
    assert await store.ledger_charge("c", 7, ttl=10) == 7  # expired: a fresh ledger
    await store.ledger_forget("c")
    assert await store.ledger_used("c") == 0


async def test_stored_pages_are_their_owners_only_bounded_and_expire(store):
    await store.put_result("r1", "alice", ["one", "two"], 9, ttl=60)
    page = await store.read_result("r1", "alice", 2)
    assert (page.text, page.count, page.tokens) == ("two", 2, 9)
    assert await store.read_result("r1", "bob", 1) is None
    assert await store.read_result("r1", "alice", 3) is None
    assert await store.read_result("nope", "alice", 1) is None
    for n in range(2, 5):
        store.now[0] += 1
        await store.put_result(f"r{n}", "alice", ["x"], 1, ttl=60)
    assert await store.read_result("r1", "alice", 1) is None  # the oldest gave way: three at most
    assert (await store.read_result("r4", "alice", 1)).text == "x"
    store.now[0] += 61
    assert await store.read_result("r4", "alice", 1) is None


async def test_two_sidecars_opening_one_file_share_ledgers_and_pages(tmp_path):
    first, second = SqliteStore(tmp_path / "state.db"), SqliteStore(tmp_path / "state.db")
    await first.ledger_charge("conversation", 40, ttl=60)
    assert await second.ledger_charge("conversation", 2, ttl=60) == 42
    await second.put_result("r", "alice", ["page"], 1, ttl=60)
    assert (await first.read_result("r", "alice", 1)).text == "page"
    assert (tmp_path / "state.db").stat().st_mode & 0o077 == 0  # the file is its user's only


def test_processes_charging_one_ledger_at_once_lose_no_charge(tmp_path):
    path = tmp_path / "state.db"
    script = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from toolmesh.sidecar.store.sqlite_store import SqliteStore
        store = SqliteStore(Path({str(path)!r}), busy_timeout=10)
        async def main():
            for _ in range(300):
                await store.ledger_charge("shared", 1, ttl=600)
        asyncio.run(main())
    """)
    workers = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(4)]
    assert [w.wait(timeout=60) for w in workers] == [0, 0, 0, 0]
    import asyncio

    assert asyncio.run(SqliteStore(path).ledger_used("shared")) == 1200


def test_a_state_file_that_cannot_be_opened_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(StoreUnavailable, match="not-a-dir"):
        SqliteStore(blocker / "state.db")
