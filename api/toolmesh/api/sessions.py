"""Sessions bound to the principal that opened them, and the one log-safe way to name a session.

Every MCP session toolmesh serves or relays (a sidecar's upstream session, a
stdio bridge session, a gateway session) is bound, when it is opened, to the
principal that opened it: a verified (issuer, subject) where a token was
verified, else a fingerprint of the credential presented (or "anonymous").
Every later request naming the session (POST, GET, DELETE, resumption, the
answer to a server request) must come from the same principal; otherwise the
session is answered as unknown (HTTP 404), so an attacker learns nothing of it.

A session id is a bearer secret: whoever holds it can act in the session.
Logs, audit lines and spans therefore carry `session_ref(id)`, a digest that
names the session for correlation and cannot be turned back into it.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

ANONYMOUS = "anonymous"
"""The principal of a caller who presented no credential."""


def session_ref(session_id: str | None) -> str | None:
    """A log-safe name for a session: 16 hex digits of its SHA-256; None for None."""
    if session_id is None:
        return None
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def credential_principal(authorization: str | None) -> str:
    """The principal of an unverified credential: a digest of the whole `Authorization` value, or ANONYMOUS.

    Used where toolmesh cannot verify the token itself (the gateway, whose
    sidecars verify): only the exact same credential matches, so a caller
    with another valid token, or a forged one naming the same subject,
    never acts in a session it did not open.
    """
    if not authorization:
        return ANONYMOUS
    return "credential:" + hashlib.sha256(authorization.encode("utf-8", "surrogatepass")).hexdigest()


def verified_principal(issuer: str | None, subject: str) -> str:
    """The principal of a verified token: its issuer and subject (a refreshed token keeps its sessions)."""
    return f"verified:{issuer or ''}\x00{subject}"


def unguessable_id(prefix: str = "") -> str:
    """An id nobody can guess or enumerate (128 random bits), for sessions and server-to-client requests."""
    return prefix + secrets.token_urlsafe(16)


@dataclass(frozen=True, slots=True)
class Binding:
    """Who opened a session, and when it was last used."""

    principal: str
    """The principal that opened the session (see module docstring)."""
    last_used: float
    """Monotonic seconds of the last request naming the session."""


class SessionBindings:
    """Session id → the principal that opened it, bounded in count; the oldest-used binding goes first.

    Not thread-safe: one event loop owns it. A session whose binding was
    evicted is unknown afterwards, so its client must open a new one
    (an MCP client does on 404): eviction never lets another principal in.
    """

    def __init__(self, max_sessions: int = 100_000) -> None:
        self.max_sessions = max_sessions
        """Bindings kept; beyond this the least recently used is forgotten."""
        self._bound: OrderedDict[str, Binding] = OrderedDict()
        self._held: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._bound)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._bound

    def bind(self, session_id: str, principal: str) -> None:
        """Record that `principal` opened `session_id` (a re-bind by another principal is ignored)."""
        current = self._bound.get(session_id)
        if current is not None and current.principal != principal:
            return
        if current is None:
            self._held[principal] += 1
        self._bound[session_id] = Binding(principal, time.monotonic())
        self._bound.move_to_end(session_id)
        while len(self._bound) > self.max_sessions:
            self._release(self._bound.popitem(last=False)[1])

    def _release(self, binding: Binding) -> None:
        left = self._held[binding.principal] - 1
        if left > 0:
            self._held[binding.principal] = left
        else:
            del self._held[binding.principal]

    def owner(self, session_id: str) -> str | None:
        """The principal bound to `session_id`, or None when the session is unknown."""
        binding = self._bound.get(session_id)
        return binding.principal if binding is not None else None

    def admits(self, session_id: str, principal: str) -> bool:
        """True when `session_id` is known and was opened by `principal`; a use refreshes it."""
        binding = self._bound.get(session_id)
        if binding is None or not secrets.compare_digest(binding.principal, principal):
            return False
        self._bound[session_id] = Binding(binding.principal, time.monotonic())
        self._bound.move_to_end(session_id)
        return True

    def forget(self, session_id: str) -> None:
        binding = self._bound.pop(session_id, None)
        if binding is not None:
            self._release(binding)

    def count(self, principal: str) -> int:
        """Sessions `principal` holds now (for per-principal caps)."""
        return self._held.get(principal, 0)

    def idle(self, seconds: float) -> list[str]:
        """Sessions not used for `seconds`, oldest first."""
        cutoff = time.monotonic() - seconds
        stale = []
        for session_id, binding in self._bound.items():
            if binding.last_used >= cutoff:
                break
            stale.append(session_id)
        return stale
