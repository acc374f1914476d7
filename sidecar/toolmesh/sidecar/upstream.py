"""What the proxy needs from an upstream MCP server, whatever its transport.

The HTTP layer speaks Streamable HTTP to clients; an `Upstream` answers in the
same terms (status, headers, a whole body or a stream of SSE events), so the
Streamable HTTP upstream, the legacy HTTP+SSE adapter and the stdio bridge are
interchangeable behind it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from toolmesh.sidecar.chain import SseEvent


async def _nothing() -> None:
    return None


@dataclass(slots=True)
class UpstreamResponse:
    """One upstream answer. Exactly one of `body` and `events` is set (or neither, for 202/204)."""

    status: int
    """HTTP status as the upstream gave it (a stdio bridge answers as a Streamable HTTP server would)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Response headers worth relaying: Content-Type, Mcp-Session-Id, MCP-Protocol-Version, Retry-After."""
    body: bytes | None = None
    """The whole body, for JSON and error answers."""
    events: AsyncIterator[SseEvent] | None = None
    """SSE events as they arrive, for text/event-stream answers; never buffered whole."""
    release: Callable[[], Awaitable[None]] = _nothing
    """Frees the connection/stream; called once when the client is done or gone (cancels the upstream work)."""


class Upstream(Protocol):
    """An MCP server the sidecar fronts."""

    async def start(self) -> None:
        """Connect or spawn; return when requests can be sent."""

    async def close(self) -> None:
        """Stop; in-flight requests fail with UpstreamUnavailable."""

    async def post(self, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        """Send one JSON-RPC message or batch (the client's POST). Raises UpstreamUnavailable / UpstreamTimeout."""

    async def get(self, headers: Mapping[str, str]) -> UpstreamResponse:
        """Open the server-initiated SSE stream (the client's GET), resuming after `Last-Event-ID` if given."""

    async def delete(self, headers: Mapping[str, str]) -> UpstreamResponse:
        """End a session (the client's DELETE)."""

    async def probe(self) -> bool:
        """A real MCP round trip (ping or initialize) proving the server answers; used by /readyz."""
