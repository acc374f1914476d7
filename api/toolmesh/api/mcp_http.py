"""The server side of MCP's HTTP transport, written once for toolmesh's two MCP servers (sidecar and gateway).

- which browser origins may call (the transport spec's DNS-rebinding protection);
- the two protocol eras, in one vocabulary: the *session era* (initialize, then `Mcp-Session-Id`; versions up to
  2025-11-25) and the *stateless era* (2026-07-28: no initialize, every request carries its version), and what a
  stateless-era server refuses before dispatch, as a verdict each side turns into its own response;
- Server-Sent Events: one bounded incremental parser and one encoder, for streams read from upstreams and
  sidecars and streams written to callers.

Each side turns what these functions decide into its own response; nothing here knows aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import re
from collections.abc import AsyncIterable, AsyncIterator, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from toolmesh.api.jsonrpc import METHOD_NOT_FOUND, error_message, has_envelope

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
"""Hosts a browser page may be served from to call a server that names no allowed origin."""


class OriginPolicy:
    """Which `Origin` headers may call: the named origins, `*` for any, and without either only local pages."""

    __slots__ = ("_any", "_origins")

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        allowed = tuple(allowed)
        self._any = "*" in allowed
        self._origins = frozenset(o.rstrip("/").lower() for o in allowed)

    def allows(self, origin: str | None) -> bool:
        """No Origin (not a browser) always may; a browser's page only from an allowed origin."""
        if origin is None or self._any:
            return True
        origin = origin.rstrip("/").lower()
        if self._origins:
            return origin in self._origins
        try:
            return urlsplit(origin).hostname in LOCAL_HOSTS
        except ValueError:
            return False


SESSION_ERA_VERSIONS: tuple[str, ...] = ("2025-11-25", "2025-06-18", "2025-03-26")
"""Session-era versions a toolmesh server offers at initialize, newest first."""
STATELESS_ERA_VERSIONS: tuple[str, ...] = ("2026-07-28",)
"""Stateless-era versions: no initialize, no session. Written here, not read from the MCP SDK, whose import costs a
pass-through sidecar 38 MB and a second at start; a test holds it equal to the SDK's `MODERN_PROTOCOL_VERSIONS`.
The SDK's inbound rules, which stateless-era refusals need, are imported when the first such request comes."""


ERROR_CODE_HTTP_STATUS: Mapping[int, int] = {-32700: 400, -32600: 400, -32602: 400, -32020: 400, -32021: 400,
                                             -32022: 400, -32601: 404}
"""The HTTP status of a stateless-era error answer, by JSON-RPC error code (200 for the rest). Written out, as the
versions are: a test holds it equal to the SDK's."""
NAME_BEARING_METHODS: Mapping[str, str] = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
"""Methods whose `Mcp-Name` header carries a parameter, and which one (a test holds it equal to the SDK's)."""
_HEADER_SAFE = re.compile(r"^[\x20-\x7E]*$")
_B64_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")


def encode_header_value(value: str) -> str:
    """`value` as an `Mcp-*` header carries it: verbatim when printable ASCII without edge whitespace, else in the
    spec's `=?base64?…?=` sentinel so the receiver recovers the exact bytes (a test holds it equal to the SDK's)."""
    if _HEADER_SAFE.fullmatch(value) and value == value.strip() and not _B64_SENTINEL.fullmatch(value):
        return value
    return f"=?base64?{base64.b64encode(value.encode('utf-8')).decode('ascii')}?="


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, matching the name case-insensitively whatever mapping the HTTP layer passed."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def is_stateless_era(message: Any, headers: Mapping[str, str]) -> bool:
    """A stateless-era request: its `MCP-Protocol-Version` header names that era, or its params carry the era's
    `_meta` envelope. (A session-era request names its version only after initialize, beside `Mcp-Session-Id`.)"""
    if header(headers, "MCP-Protocol-Version") in STATELESS_ERA_VERSIONS:
        return True
    return isinstance(message, Mapping) and has_envelope(message.get("params"))


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request refused before dispatch: its JSON-RPC error, and the HTTP status the stateless era gives that code."""

    code: int
    message: str
    data: Any = None

    @property
    def status(self) -> int:
        return ERROR_CODE_HTTP_STATUS.get(self.code, 200)

    def error(self, request_id: Any) -> dict[str, Any]:
        """The JSON-RPC error message answering `request_id`."""
        return error_message(request_id, self.code, self.message, self.data)


_stateless_rules: list[bool] = []
"""Non-empty once the rules are imported. Not `sys.modules`, which names a module while a thread still imports it:
a request that then imported it on the event loop would wait there for that thread."""


async def load_stateless_rules() -> None:
    """Import the SDK's inbound rules, which `stateless_refusal` needs, in a thread: the first stateless-era request
    of a process that has not loaded them would otherwise hold its event loop for the import (a second or more of
    CPU), stalling every other request and heartbeat meanwhile. Await it before `stateless_refusal`."""
    if not _stateless_rules:
        await asyncio.to_thread(importlib.import_module, "mcp.shared.inbound")
        _stateless_rules.append(True)


def stateless_refusal(message: Mapping[str, Any], headers: Mapping[str, str], *,
                      removed: Collection[str]) -> Refusal | None:
    """What a stateless-era server refuses before dispatch: a method in `removed` (gone in that era; the sidecar
    passes only `initialize`, leaving the rest to its upstream, the gateway every method it no longer serves),
    duplicated or mismatched routing headers, a bad `_meta` envelope. None: dispatch it."""
    from mcp.shared.inbound import InboundLadderRejection, classify_inbound_request, find_duplicated_routing_header
    from mcp_types import HEADER_MISMATCH

    method = message.get("method")
    if method in removed:
        return Refusal(METHOD_NOT_FOUND, "Method not found", method)
    duplicated = find_duplicated_routing_header(headers.items())
    if duplicated is not None:
        return Refusal(HEADER_MISMATCH, f"{duplicated} header appears more than once")
    verdict = classify_inbound_request(message, headers={k.lower(): v for k, v in headers.items()})
    if isinstance(verdict, InboundLadderRejection):
        return Refusal(verdict.code, verdict.message, verdict.data)
    return None


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One Server-Sent Event as the upstream sent it; relayed unchanged unless a stage rewrites `data`."""

    data: bytes
    """The event's data field (a JSON-RPC message), joined over its data lines."""
    id: str | None = None
    """The event id, kept so clients can resume with Last-Event-ID."""
    event: str | None = None
    """The event type, None for the default "message"."""
    retry: int | None = None
    """The reconnection delay in milliseconds the server asked for, if any."""


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
