"""The sidecar's process settings (from the command line), separate from the policy that can change while it runs."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_BATCH = 100


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    """How one sidecar process listens, hardens its endpoint and watches its upstream."""

    server_name: str = "mcp-server"
    """The MCPServer this sidecar fronts (`--server-name`); in metrics, spans and heartbeats."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body accepted; bigger ones get 413."""
    max_batch: int = DEFAULT_MAX_BATCH
    """Most messages in one JSON-RPC batch; a bigger batch is refused whole (400) before any message runs."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed to call (`--allowed-origin`); empty means localhost origins only. "*" allows any."""
    body_timeout: float = 30.0
    """Seconds a client may take to send its request body; a slower one gets 408 (a stalled upload holds nothing)."""
    sse_keepalive: float = 15.0
    """Seconds of silence on a client's server stream (GET) before a keep-alive comment; 0 disables."""
    upstream_timeout: float = 300.0
    """Seconds the upstream may stay silent on a request before the client gets 504."""
    probe_interval: float = 5.0
    """Seconds between readiness probes (a real MCP initialize) while the upstream answers."""
    ready_window: float = 15.0
    """/readyz says ready while the last successful probe is at most this old (and the last probe succeeded)."""
    transport: str = "streamable-http"
    """How the sidecar reaches the upstream, for `network.transport` and heartbeats."""
    registry: str | None = None
    """The registry's base URL (`--registry`): heartbeats, and spans when no OTLP endpoint is configured."""
