"""JSON-RPC framing and Server-Sent Events: classify client messages, parse and re-encode SSE streams.

The HTTP layer moves bytes; this module knows just enough of JSON-RPC 2.0 and
SSE to route a message to the chain and relay a stream event by event.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

import orjson

from toolmesh.api.jsonrpc import dumps as _dumps
from toolmesh.api.jsonrpc import loads as _loads
from toolmesh.sidecar.chain import NOTIFICATION, REQUEST, RESPONSE, SseEvent
from toolmesh.sidecar.errors import INVALID_REQUEST, PARSE_ERROR, Refused

_EMPTY: Mapping[str, Any] = {}


class ParseError(Refused):
    """Give up: the body is not JSON (JSON-RPC -32700, HTTP 400)."""

    code = PARSE_ERROR


class InvalidRequest(Refused):
    """Give up: JSON, but not a JSON-RPC 2.0 message (JSON-RPC -32600, HTTP 400)."""

    code = INVALID_REQUEST


def loads(body: bytes) -> Any:
    """Parse a body as JSON; ParseError when it is not."""
    try:
        return _loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParseError(f"parse error: {exc}") from None


def classify(message: Any) -> tuple[str, str, Any, Mapping[str, Any]]:
    """(kind, method, id, params) of one client message; InvalidRequest when it is not JSON-RPC 2.0.

    Kinds are chain.REQUEST, NOTIFICATION and RESPONSE; a response's method is "".
    """
    if type(message) is not dict or message.get("jsonrpc") != "2.0":
        raise InvalidRequest("invalid request: not a JSON-RPC 2.0 message")
    method = message.get("method")
    if method is not None:
        if type(method) is not str or not method:
            raise InvalidRequest("invalid request: method must be a non-empty string")
        params = message.get("params", _EMPTY)
        if params is None:
            params = _EMPTY
        elif type(params) is not dict:
            raise InvalidRequest("invalid request: params must be an object")
        if "id" not in message:
            return NOTIFICATION, method, None, params
        request_id = message["id"]
        if type(request_id) not in (str, int):
            raise InvalidRequest("invalid request: id must be a string or an integer")
        return REQUEST, method, request_id, params
    if "id" in message and ("result" in message or "error" in message):
        return RESPONSE, "", message["id"], _EMPTY
    raise InvalidRequest("invalid request: neither a request, a notification nor a response")


def request_id_of(message: Any) -> Any:
    """The id of a message if it has a usable one (for error answers), else None."""
    if type(message) is dict:
        request_id = message.get("id")
        if type(request_id) in (str, int):
            return request_id
    return None


def serialise_request(method: str, request_id: Any, params: Mapping[str, Any], *, notification: bool = False) -> bytes:
    """A request (or notification) rebuilt after a stage changed its params."""
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if not notification:
        message["id"] = request_id
    if params:
        message["params"] = params
    return _dumps(message)


# --- Server-Sent Events ------------------------------------------------------------------

MAX_EVENT_BYTES = 64 * 1024 * 1024
"""An upstream event larger than this is a broken upstream, not a result worth buffering."""


class SseParser:
    """Incremental SSE parser: feed it chunks as they arrive, get whole events back."""

    __slots__ = ("_buffer", "_max")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            # A CR at the very end may be the first half of a CRLF split across chunks.
            hold = buffer.endswith(b"\r")
            if hold:
                buffer = buffer[:-1]
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if hold:
                buffer += b"\r"
        events: list[SseEvent] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            event = _parse_block(buffer[start:end])
            if event is not None:
                events.append(event)
            start = end + 2
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max:
            raise ValueError(f"SSE event larger than {self._max} bytes")
        return events


def _parse_block(block: bytes) -> SseEvent | None:
    data: list[bytes] = []
    event_id: str | None = None
    event_type: str | None = None
    retry: int | None = None
    seen = False
    for line in block.split(b"\n"):
        if not line or line[0] == 0x3A:  # ":" starts a comment (keep-alive)
            continue
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
            seen = True
        elif name == b"id":
            event_id = value.decode("utf-8", "replace")
            seen = True
        elif name == b"event":
            event_type = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            retry = int(value)
            seen = True
    if not seen:
        return None
    return SseEvent(data=b"\n".join(data), id=event_id, event=event_type, retry=retry)


async def iter_sse(chunks: AsyncIterable[bytes], max_event_bytes: int = MAX_EVENT_BYTES) -> AsyncIterator[SseEvent]:
    """Events from a stream of byte chunks, each yielded as soon as its blank line arrives."""
    parser = SseParser(max_event_bytes)
    async for chunk in chunks:
        for event in parser.feed(chunk):
            yield event


def encode_sse(event: SseEvent) -> bytes:
    """One event in SSE wire form."""
    parts = []
    if event.id is not None:
        parts.append(b"id: " + event.id.encode() + b"\n")
    if event.event is not None:
        parts.append(b"event: " + event.event.encode() + b"\n")
    if event.retry is not None:
        parts.append(b"retry: " + str(event.retry).encode() + b"\n")
    data = event.data
    if b"\n" in data:
        for line in data.split(b"\n"):
            parts.append(b"data: " + line + b"\n")
    else:
        parts.append(b"data: " + data + b"\n")
    parts.append(b"\n")
    return b"".join(parts)
