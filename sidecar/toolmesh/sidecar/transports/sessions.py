"""A client's MCP session as a bridge presents it: its own `Mcp-Session-Id`, stream, backlog and event log.

A bridge (stdio, legacy SSE) is the Streamable HTTP server its clients see, so
it keeps their sessions itself; the `Multiplexer` (`channel.py`) routes each
session's messages over the one upstream channel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from toolmesh.api.mcp_http import SseEvent
from toolmesh.api.sessions import session_ref
from toolmesh.sidecar.transports.resumable import GET_STREAM, EventLog

if TYPE_CHECKING:
    from toolmesh.sidecar.transports.channel import Pending

log = logging.getLogger("toolmesh.sidecar.multiplex")

STREAM_LIMIT = 1000
"""Events kept for a GET stream whose client reads slowly; older ones are dropped."""
BACKLOG_LIMIT = 100
"""Notifications kept for a session that has no GET stream open yet."""


class ClientSession:
    """One client's MCP session as the bridge presents it (its own `Mcp-Session-Id`)."""

    __slots__ = ("id", "capabilities", "protocol_version", "pending", "stream", "backlog", "last_active",
                 "subscriptions", "events", "live")

    def __init__(self, session_id: str, capabilities: Mapping[str, Any], protocol_version: str | None,
                 events: EventLog | None = None):
        self.id = session_id
        self.capabilities = capabilities
        """The client's declared capabilities (sampling, elicitation, roots, ...)."""
        self.protocol_version = protocol_version
        self.pending: dict[Any, Pending] = {}
        """In-flight requests by the client's own id (for notifications/cancelled)."""
        self.stream: asyncio.Queue[SseEvent | None] | None = None
        """The open GET stream, if any; None ends it."""
        self.backlog: deque[SseEvent] = deque(maxlen=BACKLOG_LIMIT)
        self.last_active = time.monotonic()
        self.subscriptions: set[str] = set()
        """Resource URIs this client subscribed to; their updates go to it alone."""
        self.events = events if events is not None else EventLog()
        """The session's recent SSE events, for clients resuming a stream with Last-Event-ID."""
        self.live: dict[int, Pending] = {}
        """Requests answered with SSE and still running, by stream number (what a resume attaches to)."""

    def push(self, data: bytes) -> None:
        """Send a message on the session's GET stream (kept briefly when none is open)."""
        event = self.events.record(GET_STREAM, data)
        stream = self.stream
        if stream is None:
            self.backlog.append(event)
            return
        if stream.qsize() >= STREAM_LIMIT:
            stream.get_nowait()
            log.warning("session %s reads its stream too slowly; dropped its oldest event", session_ref(self.id))
        stream.put_nowait(event)
