"""Who may send heartbeats: a shared secret locally, a ServiceAccount token checked by TokenReview in a cluster."""

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


def shared_secret(secret: str | None) -> HeartbeatAuth:
    """Accept heartbeats carrying `Bearer <secret>`; with no secret configured, accept any (loopback development)."""

    async def check(header: str | None) -> AuthResult:
        if not secret:
            return AuthResult(True, "anonymous")
        token = bearer(header)
        if token is None:
            return AuthResult(False, reason="missing bearer token")
        if not hmac.compare_digest(token.encode(), secret.encode()):
            return AuthResult(False, reason="wrong shared secret")
        return AuthResult(True, "sidecar")

    return check
