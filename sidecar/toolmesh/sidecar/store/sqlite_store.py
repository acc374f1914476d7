"""Conversations shared by the sidecars of one machine through a SQLite file (`--state-file`; `toolmesh up` sets one).

`toolmesh up` runs every server as its own process. Their rate buckets and quota counts are each server's own and
stay in the process; a conversation's ledger and its stored results span servers, so they live in a file every
local sidecar opens: SQLite is in the standard library, needs no daemon, and each update is one atomic statement
(an upsert that returns the new total) however many processes write at once. The statements take microseconds,
so they run on the event loop; a writer waits for another at most `busy_timeout`.

Rows carry wall-clock expiry (processes share no monotonic clock). Ledger keys and owners are stored as digests,
as in Redis, so the file names no subject.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from toolmesh.sidecar.store.base import StoredPage, StoreUnavailable, digest
from toolmesh.sidecar.store.local import DEFAULT_MAX_RESULTS

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (key TEXT PRIMARY KEY, used INTEGER NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS results (id TEXT PRIMARY KEY, owner TEXT NOT NULL, tokens INTEGER NOT NULL,
                                    pages BLOB NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS results_by_expiry ON results (expires);
"""
_CHARGE = """
INSERT INTO ledger (key, used, expires) VALUES (:key, :tokens, :expires)
ON CONFLICT (key) DO UPDATE SET
    used = CASE WHEN ledger.expires <= :now THEN :tokens ELSE ledger.used + :tokens END,
    expires = :expires
RETURNING used
"""
_PRUNE_EVERY = 256
"""Writes between two sweeps of expired rows."""


class SqliteStore:
    """Ledgers and stored results in the SQLite file at `path`, shared by every process that opens it."""

    name = "sqlite"

    def __init__(self, path: Path, *, max_results: int = DEFAULT_MAX_RESULTS, busy_timeout: float = 1.0,
                 wall: Callable[[], float] = time.time):
        self.path = path
        self.max_results = max_results
        self._wall = wall
        self._writes = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"{path}: {exc}") from None

    def _run(self, sql: str, params: dict | tuple = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.path}: {exc.__class__.__name__}: {exc}") from None

    def _wrote(self, now: float) -> None:
        self._writes += 1
        if self._writes % _PRUNE_EVERY == 0:
            self._run("DELETE FROM ledger WHERE expires <= ?", (now,))
            self._run("DELETE FROM results WHERE expires <= ?", (now,))

    async def ledger_used(self, key: str) -> int:
        rows = self._run("SELECT used FROM ledger WHERE key = ? AND expires > ?", (digest(key), self._wall()))
        return int(rows[0][0]) if rows else 0

    async def ledger_charge(self, key: str, tokens: int, ttl: float) -> int:
        return self._charge(key, tokens, ttl)

    def ledger_charge_soon(self, key: str, tokens: int, ttl: float) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self._charge(key, tokens, ttl))
        except StoreUnavailable as exc:
            future.set_exception(exc)
        return future

    def _charge(self, key: str, tokens: int, ttl: float) -> int:
        now = self._wall()
        (used,), = self._run(_CHARGE, {"key": digest(key), "tokens": tokens, "expires": now + ttl, "now": now})
        self._wrote(now)
        return int(used)

    async def ledger_forget(self, key: str) -> None:
        self._run("DELETE FROM ledger WHERE key = ?", (digest(key),))

    async def put_result(self, result_id: str, owner: str, pages: list[str], tokens: int, ttl: float) -> None:
        now = self._wall()
        self._run("INSERT OR REPLACE INTO results (id, owner, tokens, pages, expires) VALUES (?, ?, ?, ?, ?)",
                  (result_id, digest(owner), tokens, orjson.dumps(pages), now + ttl))
        # The oldest give way beyond the bound, as in the in-process store.
        self._run("DELETE FROM results WHERE id IN (SELECT id FROM results ORDER BY expires DESC LIMIT -1 OFFSET ?)",
                  (self.max_results,))
        self._wrote(now)

    async def read_result(self, result_id: str, owner: str, number: int) -> StoredPage | None:
        rows = self._run("SELECT owner, tokens, pages FROM results WHERE id = ? AND expires > ?",
                         (result_id, self._wall()))
        if not rows:
            return None
        stored_owner, tokens, blob = rows[0]
        if not secrets.compare_digest(stored_owner.encode(), digest(owner).encode()):
            return None
        pages = orjson.loads(blob)
        if not 1 <= number <= len(pages):
            return None
        return StoredPage(pages[number - 1], len(pages), int(tokens))

    async def close(self) -> None:
        self._db.close()
