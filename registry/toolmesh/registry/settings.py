"""How the registry runs: `RegistrySettings`, every field a flag of `toolmesh registry`."""

from __future__ import annotations

from dataclasses import dataclass

from toolmesh.registry.auth import HeartbeatAuth, nobody


@dataclass(slots=True)
class RegistrySettings:
    """How the registry runs; every field has a flag in `toolmesh registry`."""

    heartbeat_interval: float = 5.0
    """Seconds between a sidecar's heartbeats (the sidecar is told this in every reply)."""
    missed_heartbeats: int = 3
    """Heartbeats an instance may miss before its tools leave the catalogue."""
    page_size: int = 1000
    """Tools per `tools/list` page at the gateway."""
    auth: HeartbeatAuth = nobody
    """Checks the Authorization header of each heartbeat and catalogue read (`/v1/servers`, `/v1/tools`)."""
    otlp_relay: str | None = None
    """Base URL of a further OTLP/HTTP collector to pass received traces on to."""
    red_window: float = 300.0
    """Seconds of tool calls the RED figures cover."""
    session_idle: float = 3600.0
    """Gateway sessions unused this long (no call, no open stream) are ended."""
    anonymous_session_idle: float = 300.0
    """Gateway sessions opened without a credential are ended sooner: unused this long."""
    max_sessions: int = 10_000
    """Gateway sessions in all; when full, the least recently used idle one is ended, else `initialize` gets 503."""
    max_sessions_per_caller: int = 100
    """Gateway sessions one credential (or all anonymous callers together) may hold; beyond, `initialize` gets 429."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the gateway (default: localhost only; "*" = any)."""
    public_url: str | None = None
    """The gateway's public MCP URL, the `resource` of its RFC 9728 metadata (default: from each request's Host)."""
    require_token: bool = False
    """While a server behind the gateway authenticates callers, answer every MCP request without a token with 401."""
