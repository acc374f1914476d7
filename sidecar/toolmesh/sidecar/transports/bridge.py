"""The Streamable HTTP server a message-channel upstream needs in front of it, written once.

A stdio child and a legacy HTTP+SSE server both move whole JSON-RPC messages
over channels of their own (one child shared by every session; one SSE
connection per session), and neither knows Streamable HTTP. A
`MessageBridge` is what their clients see instead:

- era dispatch: a stateless-era request (no `Mcp-Session-Id`, that era's header
  or envelope) is checked as an HTTP server of that era would
  (`stateless.py`) and served on a channel settled in that era, or, when the
  server has none, on the session-era channel without the era's envelope,
  its answer reshaped;
- `initialize` opens a client session, within `max_sessions` (the least
  recently used idle session is ended for room; when every one is busy, 503);
- every other message is routed to its session's channel (404 for a session
  the bridge does not know), or to the bridge's own channel without one;
- GET opens or resumes (`Last-Event-ID`) the session's stream; DELETE ends it;
- sessions whose clients left without a DELETE are ended on a timer.

A subclass says what its channels are: `_own_channel`, `_stateless_channel`,
`_session`, `_sessions`, `_new_session` and `_end_session`. A channel is
anything with a `Multiplexer`, the `ToolSchemas` read through it, and a way to
wait until it can carry messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from toolmesh.api.mcp_http import header
from toolmesh.api.sessions import session_ref
from toolmesh.sidecar.transports.base import (
    ACCEPTED,
    UpstreamResponse,
    parse_body,
    session_id_required,
    session_not_found,
    too_many_sessions,
)
from toolmesh.sidecar.transports.channel import Multiplexer
from toolmesh.sidecar.transports.sessions import ClientSession
from toolmesh.sidecar.transports.stateless import (
    ToolSchemas,
    in_stateless_shape,
    is_stateless_request,
    serve_stateless,
    stateless_rejection,
    without_envelope,
)

log = logging.getLogger("toolmesh.sidecar.bridge")

SWEEP_EVERY = 60.0
"""Most seconds between two sweeps of idle sessions (a sweep also runs every half idle timeout, if that is sooner)."""


class Channel(Protocol):
    """One upstream message channel as a bridge uses it."""

    mux: Multiplexer
    schemas: ToolSchemas

    async def wait_ready(self) -> None:
        """Return once the channel carries messages; UpstreamUnavailable when it does not come back in time."""


class MessageBridge:
    """An `Upstream` for servers reached over message channels; subclasses supply the channels."""

    answers_initialized = False
    """True when the bridge sent the upstream the one `notifications/initialized` it needs (a shared channel):
    the clients' own are acknowledged here."""

    def __init__(self, *, max_sessions: int, session_idle_timeout: float):
        self.max_sessions = max_sessions
        """Most client sessions open at once (`--max-sessions`)."""
        self.session_idle_timeout = session_idle_timeout
        self._resumable = True
        self._sweeper: asyncio.Task[None] | None = None

    # -- what a subclass supplies -----------------------------------------------------------------------------

    async def _own_channel(self) -> Channel:
        """The bridge's own session-era channel: probes and requests without a session."""
        raise NotImplementedError

    async def _stateless_channel(self) -> Channel | None:
        """A channel settled in the stateless era, or None when the server has no such era."""
        raise NotImplementedError

    def _session(self, session_id: str) -> tuple[Channel, ClientSession] | None:
        """The channel and session a client's `Mcp-Session-Id` names, if the bridge knows it."""
        raise NotImplementedError

    def _sessions(self) -> Iterable[tuple[Channel, ClientSession]]:
        """Every open client session with its channel."""
        raise NotImplementedError

    def _session_count(self) -> int:
        """Client sessions open (or opening) now, against `max_sessions`."""
        raise NotImplementedError

    async def _new_session(self, message: dict[str, Any], body: bytes | None) -> UpstreamResponse:
        """Open a session for a client's `initialize` (there is room); its answer carries the new `Mcp-Session-Id`."""
        raise NotImplementedError

    async def _end_session(self, channel: Channel, session: ClientSession) -> None:
        """Forget a session: cancel what it has in flight, end its streams (and its channel, if it had its own)."""
        raise NotImplementedError

    def _muxes(self) -> Iterable[Multiplexer]:
        """Every multiplexer of the bridge (for settings that apply to all)."""
        raise NotImplementedError

    # -- the Upstream contract --------------------------------------------------------------------------------

    @property
    def resumable(self) -> bool:
        """Whether clients may resume SSE streams with Last-Event-ID (see `Multiplexer.resumable`)."""
        return self._resumable

    @resumable.setter
    def resumable(self, value: bool) -> None:
        self._resumable = value
        for mux in self._muxes():
            mux.resumable = value

    async def post(self, body: bytes, headers: Mapping[str, str], message: Any = None) -> UpstreamResponse:
        if message is None:
            message = parse_body(body)
            if isinstance(message, UpstreamResponse):
                return message
        method = message.get("method") if isinstance(message, dict) else None
        session_id = header(headers, "Mcp-Session-Id")
        if session_id is None and is_stateless_request(message, headers):
            rejected = stateless_rejection(message, headers)
            if rejected is not None:
                return rejected
            stateless = await self._stateless_channel()
            if stateless is not None:
                await stateless.wait_ready()
                return await serve_stateless(stateless.mux, stateless.schemas, message, body, headers)
            if method != "server/discover":
                # A server with no stateless era: ask it without the envelope, and answer in the client's era.
                own = await self._own_channel()
                await own.wait_ready()
                answer = await own.mux.post(without_envelope(message), None)
                return in_stateless_shape(answer, str(method))
        if method == "initialize" and "id" in message:
            return await self._open_session(message, body)
        session: ClientSession | None = None
        if session_id is None:
            channel = await self._own_channel()
        else:
            found = self._session(session_id)
            if found is None:
                return session_not_found(message)
            channel, session = found
            channel.mux.touch(session)
        if method == "notifications/initialized" and self.answers_initialized:
            return ACCEPTED
        await channel.wait_ready()
        return await channel.mux.post(message, session, body)

    async def get(self, headers: Mapping[str, str]) -> UpstreamResponse:
        session_id = header(headers, "Mcp-Session-Id")
        if session_id is None:
            return session_id_required()
        found = self._session(session_id)
        if found is None:
            return session_not_found(None)
        channel, session = found
        channel.mux.touch(session)
        last_event_id = header(headers, "Last-Event-ID")
        if last_event_id is not None:
            return channel.mux.resume(session, last_event_id)
        return channel.mux.open_stream(session)

    async def delete(self, headers: Mapping[str, str]) -> UpstreamResponse:
        session_id = header(headers, "Mcp-Session-Id")
        found = self._session(session_id) if session_id is not None else None
        if found is None:
            return session_not_found(None)
        await self._end_session(*found)
        return UpstreamResponse(status=200)

    # -- sessions ---------------------------------------------------------------------------------------------

    async def _open_session(self, message: dict[str, Any], body: bytes | None) -> UpstreamResponse:
        if self._session_count() >= self.max_sessions:
            room = self._least_recently_used_idle()
            if room is None:
                return too_many_sessions(message["id"], self.max_sessions)
            log.info("session limit %d reached: ended session %s, the least recently used idle one",
                     self.max_sessions, session_ref(room[1].id))
            await self._end_session(*room)
        return await self._new_session(message, body)

    def _least_recently_used_idle(self) -> tuple[Channel, ClientSession] | None:
        """The session to end for room for a new one: used longest ago, nothing in flight, no stream open."""
        idle = [(channel, session) for channel, session in self._sessions() if channel.mux.is_idle(session)]
        return min(idle, key=lambda pair: pair[1].last_active, default=None)

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            # A fresh context: the sweep outlives the request that started the bridge, and must not carry its state.
            self._sweeper = asyncio.create_task(self._sweep_idle_sessions(), name="bridge session sweep",
                                                context=contextvars.Context())

    async def _stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep_idle_sessions(self) -> None:
        """End sessions whose clients left without a DELETE, on a timer (not only when a new one opens)."""
        every = max(0.01, min(SWEEP_EVERY, self.session_idle_timeout / 2))
        while True:
            await asyncio.sleep(every)
            cutoff = time.monotonic() - self.session_idle_timeout
            for channel, session in list(self._sessions()):
                if session.last_active < cutoff and channel.mux.is_idle(session):
                    log.debug("ended session %s: idle for %gs", session_ref(session.id), self.session_idle_timeout)
                    await self._end_session(channel, session)
