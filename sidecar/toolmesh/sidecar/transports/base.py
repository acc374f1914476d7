"""What the proxy needs from an upstream MCP server, whatever its transport, and the answers every bridge gives.

The HTTP layer speaks Streamable HTTP to clients; an `Upstream` answers in the
same terms (status, headers, a whole body or a stream of SSE events), so the
Streamable HTTP upstream (`http.py`), the legacy HTTP+SSE adapter
(`legacy_sse.py`) and the stdio bridge (`stdio.py`) are interchangeable behind
it. The chain hands over the message it already parsed, so a bridge that must
read it (to route it by session and id) never parses it again.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from toolmesh.api.jsonrpc import INVALID_REQUEST, PARSE_ERROR, UPSTREAM_UNAVAILABLE, dumps, error_message, loads
from toolmesh.api.mcp_http import Refusal, SseEvent

log = logging.getLogger("toolmesh.sidecar.transports")


async def _nothing() -> None:
    return None


@dataclass(slots=True)
class UpstreamResponse:
    """One upstream answer. Exactly one of `body` and `events` is set (or neither, for 202/204)."""

    status: int
    """HTTP status as the upstream gave it (a bridge answers as a Streamable HTTP server would)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Response headers worth relaying: Content-Type, Mcp-Session-Id, MCP-Protocol-Version, Retry-After."""
    body: bytes | None = None
    """The whole body, for JSON and error answers."""
    events: AsyncIterator[SseEvent] | None = None
    """SSE events as they arrive, for text/event-stream answers; never buffered whole."""
    release: Callable[[], Awaitable[None]] = _nothing
    """Frees the connection/stream; called once when the client is done or gone (cancels the upstream work)."""
    message: Any = None
    """`body` parsed, when the transport already had to parse it (a bridge routing the answer): never parsed twice."""


class Upstream(Protocol):
    """An MCP server the sidecar fronts."""

    async def start(self) -> None:
        """Connect or spawn; return when requests can be sent."""

    async def close(self) -> None:
        """Stop; in-flight requests fail with UpstreamUnavailable."""

    async def post(self, body: bytes, headers: Mapping[str, str], message: Any = None) -> UpstreamResponse:
        """Send one JSON-RPC message or batch (the client's POST). `message` is `body` parsed, when the caller has
        it; a transport that reads messages may take it instead of parsing `body`, and must not change it.
        Raises UpstreamUnavailable / UpstreamTimeout."""

    async def get(self, headers: Mapping[str, str]) -> UpstreamResponse:
        """Open the server-initiated SSE stream (the client's GET), resuming after `Last-Event-ID` if given."""

    async def delete(self, headers: Mapping[str, str]) -> UpstreamResponse:
        """End a session (the client's DELETE)."""

    async def probe(self) -> bool:
        """A real MCP round trip (ping or initialize) proving the server answers; used by /readyz."""


# -- the answers a bridge gives as the Streamable HTTP server its clients see ---------------------------------

JSON_HEADERS: Mapping[str, str] = {"Content-Type": "application/json"}
SSE_HEADERS: Mapping[str, str] = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
ACCEPTED = UpstreamResponse(status=202)


def json_response(status: int, message: Any, headers: Mapping[str, str] | None = None) -> UpstreamResponse:
    return UpstreamResponse(status=status, headers={**JSON_HEADERS, **(headers or {})}, body=dumps(message),
                            message=message)


def parse_body(body: bytes) -> Any | UpstreamResponse:
    """The parsed JSON-RPC message or batch, or the HTTP answer to a body that is not JSON."""
    try:
        return loads(body)
    except orjson.JSONDecodeError as exc:
        return json_response(400, error_message(None, PARSE_ERROR, "Parse error", str(exc)))


def invalid_request(request_id: Any = None) -> UpstreamResponse:
    return json_response(400, error_message(request_id, INVALID_REQUEST, "Invalid Request"))


def refused(request_id: Any, refusal: Refusal) -> UpstreamResponse:
    """A request refused before dispatch, with the HTTP status the stateless era gives its code."""
    return json_response(refusal.status, refusal.error(request_id))


def session_not_found(message: Any) -> UpstreamResponse:
    """The 404 for a request naming a session the bridge does not know: the client starts a new one."""
    request_id = message.get("id") if isinstance(message, dict) else None
    return json_response(404, error_message(request_id, INVALID_REQUEST, "Session not found"))


def too_many_sessions(request_id: Any, max_sessions: int) -> UpstreamResponse:
    """The 503 for an initialize when a bridge holds `max_sessions` sessions and none is idle enough to end."""
    log.warning("refused a new session: all %d sessions are busy", max_sessions)
    return json_response(503, error_message(
        request_id, UPSTREAM_UNAVAILABLE,
        f"too many sessions: this bridge holds at most {max_sessions} (--max-sessions) and every one "
        "has a call in flight or a stream open; retry later", {"maxSessions": max_sessions}))


def session_id_required() -> UpstreamResponse:
    """The 400 for a GET without `Mcp-Session-Id`: only a session has a stream to open."""
    return json_response(400, error_message(None, INVALID_REQUEST, "Bad Request: Mcp-Session-Id required"))
