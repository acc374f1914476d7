"""Gateway sessions of the session era: who holds them, how many, and when they end.

A gateway session belongs to the principal that opened it. The gateway does
not verify tokens (its sidecars do), so that principal is the exact
credential presented at `initialize` (`credential_principal`: a digest of the
whole `Authorization` value, or "anonymous"). Every later request naming the
session — calls, cancellations, answers to a server's questions, the GET
stream, DELETE — must present the same credential, or the session is answered
as unknown (404), exactly as one that never existed. A client that refreshes
or changes its token therefore opens a new session (an MCP client does on 404).

Sessions are bounded: at most `max_sessions` in all and `max_sessions_per_caller`
per principal. A principal at its cap is refused a new one (HTTP 429, naming
the cap); when the gateway is full, the least recently used session with no
call in flight and no open stream is ended to make room, else the newcomer is
refused (HTTP 503). Anonymous sessions idle sooner (`expire`).
Session ids never appear in logs: `session_ref()` names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from toolmesh.api.jsonrpc import dumps
from toolmesh.api.sessions import ANONYMOUS, credential_principal, session_ref, unguessable_id
from toolmesh.registry.backend import BackendPool, Notify

log = logging.getLogger("toolmesh.registry")

OUTBOX_SIZE = 64
"""Server-initiated messages kept for a session's GET stream; beyond, list changes are coalesced and others dropped."""
REFUSAL_LOG_EVERY = 60.0
"""Seconds between two log lines about refused sessions (a flood must not flood the log too)."""


@dataclass(slots=True, eq=False)
class GatewaySession:
    """One session-era client of the gateway; what only some sessions need is made on first use (sessions are many)."""

    id: str
    """The `Mcp-Session-Id`: a bearer secret, never logged (see `session_ref`)."""
    protocol_version: str
    principal: str
    """Who opened it (`credential_principal` of its `Authorization`); only they may name it."""
    outbox: asyncio.Queue[bytes] | None = None
    """Server-initiated messages waiting for (or flowing to) the GET stream; made when first needed."""
    list_changed: bool = False
    """A tools list change is to be announced once the outbox exists (no queue is made just for that)."""
    in_flight: dict[Any, asyncio.Task] = field(default_factory=dict)
    """Running requests by the client's JSON-RPC id, so `notifications/cancelled` can stop them."""
    asks: dict[str, asyncio.Future[dict[str, Any]]] | None = None
    """Server requests put to this session's caller, by the unguessable id the gateway gave them."""
    last_used: float = field(default_factory=time.monotonic)
    """When the client last sent anything; idle sessions are ended."""
    streams: int = 0
    """Open GET streams (a client listening is never idle)."""
    called: bool = False
    """It sent something a sidecar saw, so ending it ends sessions with sidecars too."""

    @property
    def budget_key(self) -> str:
        """What sidecars know this session by (`Mcp-Budget-Key` when the caller sets none): never the id itself."""
        return "gateway-session:" + (session_ref(self.id) or "")

    @property
    def busy(self) -> bool:
        """A call in flight or a stream open: never ended for room or idleness."""
        return bool(self.in_flight or self.streams)

    def outbox_queue(self) -> asyncio.Queue[bytes]:
        if self.outbox is None:
            self.outbox = asyncio.Queue(maxsize=OUTBOX_SIZE)
        return self.outbox

    def wake(self) -> None:
        """Wake the GET stream, if one listens, to see that the session is gone."""
        if self.outbox is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self.outbox.put_nowait(b"")


class SessionRefused(Exception):
    """No room for a new gateway session: the caller should retry later, or end sessions it no longer uses."""

    def __init__(self, status: int, message: str, retry_after: int):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class Sessions:
    """The gateway's session-era sessions by id, least recently used first, within their caps."""

    def __init__(self, backends: BackendPool, *, max_sessions: int = 10_000,
                 max_sessions_per_caller: int = 100) -> None:
        self.backends = backends
        self.max_sessions = max_sessions
        """Sessions kept in all; beyond, the least recently used idle one goes, or the newcomer is refused."""
        self.max_sessions_per_caller = max_sessions_per_caller
        """Sessions one principal may hold; beyond, its `initialize` is refused."""
        self._sessions: OrderedDict[str, GatewaySession] = OrderedDict()
        self._held: Counter[str] = Counter()
        """Principal → sessions it holds."""
        self._refused = 0
        self._refusal_logged = 0.0
        self._closing: set[asyncio.Task] = set()
        """Sidecar sessions of evicted gateway sessions being closed in the background."""

    def __iter__(self) -> Iterator[GatewaySession]:
        return iter(self._sessions.values())

    def count(self, principal: str | None = None) -> int:
        """Sessions open now, in all or held by `principal`."""
        return len(self._sessions) if principal is None else self._held.get(principal, 0)

    def open(self, principal: str, protocol_version: str) -> GatewaySession:
        """A new session for `principal`, made room for; raises SessionRefused (see the module docstring)."""
        try:
            self._make_room(principal)
        except SessionRefused as exc:
            self._log_refusal(exc)
            raise
        session = GatewaySession(id=unguessable_id(), protocol_version=protocol_version, principal=principal)
        self._sessions[session.id] = session
        self._held[principal] += 1
        return session

    def named_by(self, request: web.Request) -> GatewaySession | None:
        """The session a request names, if it comes from the principal that opened it; else None (answer 404).

        Another principal's session and one that never existed look the same,
        so nobody learns whether a session id is live. A use counts as
        activity: the session becomes the most recently used.
        """
        session = self._sessions.get(request.headers.get("Mcp-Session-Id", ""))
        if session is None:
            return None
        principal = credential_principal(request.headers.get("Authorization"))
        if not secrets.compare_digest(session.principal, principal):
            return None
        self.touch(session)
        return session

    def live(self, session: GatewaySession) -> bool:
        """The session is still open (not ended, evicted or expired)."""
        return self._sessions.get(session.id) is session

    def touch(self, session: GatewaySession) -> None:
        session.last_used = time.monotonic()
        if self.live(session):
            self._sessions.move_to_end(session.id)

    def relay_to(self, session: GatewaySession) -> Notify:
        """Notifications a server sends outside any call (resource updates, list changes) → the session's GET stream."""
        async def relay(note: Mapping[str, Any]) -> None:
            if self.live(session):
                with contextlib.suppress(asyncio.QueueFull):
                    session.outbox_queue().put_nowait(dumps(note))

        return relay

    async def end(self, session: GatewaySession) -> None:
        """Forget a session: stop its calls, close its GET stream, end its sessions with the sidecars."""
        if self._forget(session) and session.called:
            await self.backends.end_sessions(session.budget_key)

    async def expire(self, idle: float, anonymous_idle: float | None = None) -> None:
        """End sessions nobody used for `idle` seconds (`anonymous_idle` for anonymous ones): clients that vanished
        without DELETE. A session with a call in flight or an open stream is never idle."""
        anonymous_idle = idle if anonymous_idle is None else anonymous_idle
        now = time.monotonic()
        newest = now - min(idle, anonymous_idle)
        stale = []
        for session in self._sessions.values():  # least recently used first: stop at the first too recent
            if session.last_used >= newest:
                break
            limit = anonymous_idle if session.principal == ANONYMOUS else idle
            if session.last_used < now - limit and not session.busy:
                stale.append(session)
        for session in stale:
            await self.end(session)

    def close(self) -> None:
        """End every session (the registry is stopping): their calls stop, their streams end."""
        sessions = list(self._sessions.values())
        self._sessions.clear()
        self._held.clear()
        for task in self._closing:
            task.cancel()
        for session in sessions:
            for task in session.in_flight.values():
                task.cancel()
            session.wake()

    def _forget(self, session: GatewaySession) -> bool:
        """Drop a session from the table, stop its calls and wake its stream; False when it was already gone."""
        if not self.live(session):
            return False
        del self._sessions[session.id]
        left = self._held[session.principal] - 1
        if left > 0:
            self._held[session.principal] = left
        else:
            del self._held[session.principal]
        for task in session.in_flight.values():
            task.cancel()
        session.wake()  # the GET stream sees the session gone
        return True

    def _evict(self, session: GatewaySession) -> None:
        """End a session to make room, without waiting for its sidecar sessions to close."""
        if self._forget(session) and session.called:
            task = asyncio.get_running_loop().create_task(self.backends.end_sessions(session.budget_key))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _make_room(self, principal: str) -> None:
        """Room for one more session of `principal`, or SessionRefused (see the module docstring)."""
        if self._held.get(principal, 0) >= self.max_sessions_per_caller:
            raise SessionRefused(429, f"too many sessions for this caller (at most {self.max_sessions_per_caller} "
                                      "per credential); end sessions you no longer use (DELETE)", 60)
        if len(self._sessions) < self.max_sessions:
            return
        idle = next((s for s in self._sessions.values() if not s.busy), None)
        if idle is None:
            raise SessionRefused(503, f"the gateway holds its maximum of {self.max_sessions} sessions, all busy", 5)
        log.info("gateway session %s ended to make room (at most %d sessions)", session_ref(idle.id),
                 self.max_sessions)
        self._evict(idle)

    def _log_refusal(self, exc: SessionRefused) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_EVERY:
            self._refusal_logged = now
            log.warning("gateway refused %d new session(s) in the last %gs: %s", self._refused, REFUSAL_LOG_EVERY,
                        exc.message)
            self._refused = 0
