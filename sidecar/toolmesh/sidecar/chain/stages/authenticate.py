"""Authenticate stage: turns the bearer token into a verified `Caller`, or answers 401 with a `WWW-Authenticate` challenge.

It also binds every session to the principal that opened it (`toolmesh.api.sessions`):
the session id the upstream (an HTTP server, or the stdio/SSE bridge) gives an
`initialize` is recorded with the verified caller, and any later request naming
that session (POST, GET stream or resumption, DELETE) from another principal, or
naming a session not opened through this sidecar, is answered 404 as an unknown
session before it reaches the upstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from toolmesh.api.policy import AuthPolicy, Issuer, MCPToolPolicySpec
from toolmesh.api.sessions import ANONYMOUS as ANONYMOUS_PRINCIPAL
from toolmesh.api.sessions import SessionBindings, verified_principal
from toolmesh.sidecar.telemetry import stage_metrics
from toolmesh.sidecar.chain.stages.audit import AuditLog, audit_log_for
from toolmesh.sidecar.chain.frame import REQUEST, SESSION_END, Caller, CallContext, Handler, Outcome, derive, header
from toolmesh.sidecar.errors import SessionNotFound, Unauthenticated
from toolmesh.sidecar.chain.protected_resource import challenge
from toolmesh.sidecar.chain.state import JWKS, SESSION_BINDINGS, SharedState

if TYPE_CHECKING:
    from toolmesh.sidecar.chain.stages.jwks import JwksKeys
    from toolmesh.sidecar.chain.stages.jwt_verify import TokenVerifier

NAME = "authenticate"

ANONYMOUS = Caller(subject="anonymous")
"""The caller of a request without a token when the policy does not require one."""

def principal_of(caller: Caller) -> str:
    """Whom a session belongs to: the verified issuer and subject, or the anonymous principal."""
    if caller is ANONYMOUS:
        return ANONYMOUS_PRINCIPAL
    return verified_principal(caller.issuer, caller.subject)


def bearer_token(headers: Any) -> str | None:
    """The raw `Authorization` header value, or None when absent."""
    value = headers.get("Authorization")
    if value is None:
        value = headers.get("authorization")
    return value


class AuthenticateStage:
    """Verifies the bearer token of every request and puts the caller into the context."""

    def __init__(self, auth: AuthPolicy, verifier: TokenVerifier, audit: AuditLog | None, server_name: str | None = None,
                 shared: SharedState | None = None, sessions: SessionBindings | None = None):
        # pyjwt and cryptography cost ~0.1 s of start-up: imported only once a policy asks for auth.
        from toolmesh.sidecar.chain.stages.jwt_verify import InvalidToken

        self._invalid_token = InvalidToken
        self.auth = auth
        self.verifier = verifier
        self.audit = audit
        self.server_name = server_name
        self.sessions = sessions if sessions is not None else SessionBindings()
        self.requests = stage_metrics.counter(
            shared, "toolmesh_auth_requests_total",
            "Requests by authentication result (verified, cached, anonymous, missing, invalid).", ("result",))

    async def __call__(self, ctx: CallContext, call_next: Handler) -> Outcome:
        header = bearer_token(ctx.headers)
        if header is None:
            if not self.auth.required:
                self.requests.inc("anonymous")
                return await self._in_session(derive(ctx, caller=ANONYMOUS), call_next)
            self.requests.inc("missing")
            self._refuse(ctx, "no bearer token")
            raise Unauthenticated(
                "authentication required: send a bearer token",
                headers={"WWW-Authenticate": challenge(self.auth, ctx.headers)},
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            self.requests.inc("invalid")
            self._refuse(ctx, "malformed Authorization header")
            raise Unauthenticated(
                "malformed Authorization header: expected 'Bearer <token>'",
                headers={"WWW-Authenticate": challenge(self.auth, ctx.headers, error="invalid_request")},
            )
        checked = self.verifier.verifications
        try:
            caller = await self.verifier.verify(token)
        except self._invalid_token as exc:
            self.requests.inc("invalid")
            self._refuse(ctx, exc.reason)
            raise Unauthenticated(
                f"invalid bearer token: {exc.reason}",
                headers={
                    "WWW-Authenticate": challenge(
                        self.auth, ctx.headers, error="invalid_token", description=exc.reason
                    )
                },
            ) from None
        self.requests.inc("cached" if self.verifier.verifications == checked else "verified")
        # The upstream request carries this caller, never the token (see pipeline.forward_headers).
        return await self._in_session(derive(ctx, caller=caller), call_next)

    async def _in_session(self, ctx: CallContext, call_next: Handler) -> Outcome:
        """Run the call if its session (if any) is the caller's; bind the session an initialize opens."""
        if ctx.record is not None:
            ctx.record.caller = ctx.caller
        principal = principal_of(ctx.caller)
        session_id = ctx.session_id
        if ctx.kind == REQUEST and ctx.method == "initialize":
            sessions = self.sessions

            async def start_stream(headers: Any) -> None:
                # A streamed answer hands the client its session id before the chain returns: bind it first.
                opened = header(headers, "Mcp-Session-Id")
                if opened:
                    sessions.bind(opened, principal)
                await ctx.start_stream(headers)

            outcome = await call_next(derive(ctx, start_stream=start_stream))
            opened = header(outcome.headers, "Mcp-Session-Id")
            if opened and outcome.status < 400:
                sessions.bind(opened, principal)
            return outcome
        if session_id is None:
            return await call_next(ctx)
        if not self.sessions.admits(session_id, principal):
            # Another principal's session, or one never opened here: the same answer as a session that
            # does not exist, so a guessed or leaked id tells an attacker nothing.
            self._refuse(ctx, "session not bound to this caller", ctx.caller.subject)
            raise SessionNotFound("Session not found")
        outcome = await call_next(ctx)
        if ctx.kind == SESSION_END and outcome.status < 400:
            self.sessions.forget(session_id)
        return outcome

    def _refuse(self, ctx: CallContext, reason: str, subject: str | None = None) -> None:
        if self.audit is not None:
            self.audit.record(
                request_id=ctx.request_id,
                subject=subject,
                method=ctx.method,
                tool=ctx.tool,
                allowed=False,
                reason=reason if subject is not None else f"unauthenticated: {reason}",
                session_id=ctx.session_id,
                server=self.server_name,
            )


def build(policy: MCPToolPolicySpec, shared: SharedState) -> AuthenticateStage | None:
    """The stage for `policy.auth`, or None without one. JWKS caches outlive reloads; verified tokens do not."""
    auth = policy.auth
    if auth is None:
        return None
    from toolmesh.sidecar.chain.stages.jwks import JwksKeys
    from toolmesh.sidecar.chain.stages.jwt_verify import TokenVerifier

    jwks_cache = shared.kept(JWKS, dict)

    def jwks_for(issuer: Issuer) -> JwksKeys:
        keys = jwks_cache.get(issuer.jwksUrl)
        if keys is None:
            keys = jwks_cache[issuer.jwksUrl] = JwksKeys(issuer.jwksUrl)
        keys.cache_seconds = issuer.jwksCacheSeconds
        keys.min_refresh_seconds = issuer.jwksMinRefreshSeconds
        return keys

    verifier = TokenVerifier(auth, jwks_for)
    sessions = shared.kept(SESSION_BINDINGS, SessionBindings)
    return AuthenticateStage(auth, verifier, audit_log_for(policy, shared), shared.server_name, shared, sessions)
