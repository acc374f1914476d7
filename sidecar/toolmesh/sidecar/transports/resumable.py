"""A bridged session's recent SSE events, kept so a client that lost a stream resumes it with Last-Event-ID.

The stdio bridge and the legacy SSE adapter are the Streamable HTTP server
their clients see, so resumability (the transport spec's "Resumability and
Redelivery", and SEP-1699's priming event and `retry:` field) is theirs to
give. Every session has one `EventLog`: each SSE stream of the session gets a
number (0 is the session's GET stream, each POST answered with SSE the next
one), and each event on it an id `<stream>-<seq>`, `seq` counting up across
the session. A resume names the stream through the id, so only that stream's
later events are replayed. The log is bounded in events and bytes; the oldest
go first, and a Last-Event-ID whose stream lost events after it is expired.
"""

from __future__ import annotations

from collections import deque

from toolmesh.api.mcp_http import SseEvent

RETRY_MS = 1000
"""The `retry:` field (milliseconds) on each stream's priming event: how soon a client that lost it reconnects."""
GET_STREAM = 0
"""The stream number of the session's GET stream (POST streams count up from 1)."""
MAX_EVENTS = 1000
"""Events kept per session, over all its streams."""
MAX_BYTES = 4 << 20
"""Bytes of event data kept per session (each event also counts `_OVERHEAD`)."""
_OVERHEAD = 64
"""Bytes counted per kept event besides its data: an event of no data still costs memory."""


class ResumeRefused(Exception):
    """The Last-Event-ID cannot be resumed: never issued in this session, or events after it were dropped."""


class EventLog:
    """One session's recent events, by stream, for replay after a Last-Event-ID."""

    __slots__ = ("max_events", "max_bytes", "_events", "_bytes", "_seq", "_streams", "_evicted", "_forgotten_below",
                 "_get_evicted")

    def __init__(self, max_events: int = MAX_EVENTS, max_bytes: int = MAX_BYTES):
        self.max_events = max_events
        """Most events kept; the oldest is dropped first."""
        self.max_bytes = max_bytes
        """Most bytes kept (data plus a fixed overhead per event); the oldest events are dropped first."""
        self._events: deque[tuple[int, int, SseEvent]] = deque()
        self._bytes = 0
        self._seq = 0
        self._streams = GET_STREAM + 1
        self._evicted: dict[int, int] = {}
        """POST stream -> the highest seq dropped from it (bounded: see `_forget_oldest_stream`)."""
        self._forgotten_below = GET_STREAM + 1
        """POST streams numbered below this may have lost events the log no longer knows about."""
        self._get_evicted = 0

    def __len__(self) -> int:
        return len(self._events)

    @property
    def size(self) -> int:
        """Bytes held (as counted against `max_bytes`)."""
        return self._bytes

    def open_stream(self) -> tuple[int, SseEvent]:
        """A new POST stream and its priming event (an id, no data, and the `retry:` field)."""
        stream = self._streams
        self._streams += 1
        return stream, self.priming(stream)

    def priming(self, stream: int) -> SseEvent:
        """An event a client may resume after, before anything else is sent on `stream` (kept by its seq alone)."""
        self._seq += 1
        return SseEvent(data=b"", id=f"{stream}-{self._seq}", retry=RETRY_MS)

    def record(self, stream: int, data: bytes) -> SseEvent:
        """`data` as the next event of `stream`, with its id; kept for replay while the bounds allow."""
        self._seq += 1
        event = SseEvent(data=data, id=f"{stream}-{self._seq}")
        self._events.append((self._seq, stream, event))
        self._bytes += len(data) + _OVERHEAD
        while self._events and (len(self._events) > self.max_events or self._bytes > self.max_bytes):
            self._drop_oldest()
        return event

    def _drop_oldest(self) -> None:
        seq, stream, event = self._events.popleft()
        self._bytes -= len(event.data) + _OVERHEAD
        if stream == GET_STREAM:
            self._get_evicted = seq
            return
        self._evicted.pop(stream, None)  # re-inserted last: the dict stays in order of last eviction
        self._evicted[stream] = seq
        if len(self._evicted) > self.max_events:
            self._forget_oldest_stream()

    def _forget_oldest_stream(self) -> None:
        """Bound the per-stream eviction marks: the stream evicted from longest ago is given up on altogether."""
        stream = next(iter(self._evicted))
        del self._evicted[stream]
        self._forgotten_below = max(self._forgotten_below, stream + 1)

    def after(self, last_event_id: str) -> tuple[int, list[SseEvent]]:
        """The stream `last_event_id` belongs to and its kept events after it; ResumeRefused when that is not all."""
        stream_text, sep, seq_text = last_event_id.strip().partition("-")
        if not sep or not stream_text.isdigit() or not seq_text.isdigit():
            raise ResumeRefused(f"unknown Last-Event-ID {last_event_id!r}")
        stream, seq = int(stream_text), int(seq_text)
        if stream >= self._streams or seq > self._seq:
            raise ResumeRefused(f"unknown Last-Event-ID {last_event_id!r}")
        if stream == GET_STREAM:
            lost = self._get_evicted > seq
        else:
            lost = stream < self._forgotten_below or self._evicted.get(stream, 0) > seq
        if lost:
            raise ResumeRefused(f"expired Last-Event-ID {last_event_id!r}: events after it were dropped")
        return stream, [event for s, st, event in self._events if st == stream and s > seq]
