"""Who may send heartbeats and read the catalogue: a shared secret, TokenReview in a cluster, anyone if --insecure."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

HeartbeatAuth = Callable[[str | None], Awaitable["AuthResult"]]
"""Checks the `Authorization` header of a heartbeat."""


@dataclass(frozen=True, slots=True)
class AuthResult:
    allowed: bool
    """True when the sender may report servers."""
    identity: str = ""
    """Who sent it (a ServiceAccount username in a cluster)."""
    reason: str = ""
    """Why it was refused."""
    namespace: str | None = None
    """The sender's namespace when its identity is a ServiceAccount; its heartbeats speak for that namespace only."""


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


async def nobody(header: str | None) -> AuthResult:
    """No credential configured: refuse every heartbeat (a registry must be told whom to trust)."""
    return AuthResult(False, reason="the registry has no heartbeat credential configured")


async def anyone(header: str | None) -> AuthResult:
    """`--insecure`: accept every heartbeat and catalogue read, from anyone who can connect (loopback development).

    A rogue heartbeat then routes callers, and their bearer tokens, to any endpoint it names.
    """
    return AuthResult(True, "anonymous")


def shared_secret(secret: str) -> HeartbeatAuth:
    """Accept heartbeats carrying `Bearer <secret>` (local mode)."""
    if not secret:
        raise ValueError("an empty shared secret would let anyone report servers")

    async def check(header: str | None) -> AuthResult:
        token = bearer(header)
        if token is None:
            return AuthResult(False, reason="missing bearer token")
        if not hmac.compare_digest(token.encode(), secret.encode()):
            return AuthResult(False, reason="wrong shared secret")
        return AuthResult(True, "sidecar")

    return check
