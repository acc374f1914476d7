"""Bearer-token verification: which issuer, which key, which algorithms, which claims; verified tokens remembered until they expire."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from toolmesh.api.policy import AuthPolicy, Issuer, PolicyError
from toolmesh.sidecar.chain.frame import Caller
from toolmesh.sidecar.chain.stages.jwks import JwksKeys, JwksUnavailable

log = logging.getLogger("toolmesh.sidecar.auth")

MAX_TOKEN_BYTES = 16 * 1024
"""Longer bearer tokens are refused before any parsing."""

REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]

# The key type each algorithm family verifies with; a JWKS key of another type never verifies a token.
_KEY_TYPE = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP", "HS": "oct"}


class InvalidToken(Exception):
    """The bearer token is not acceptable; `reason` is a short phrase safe to show the client and the audit log."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_DEFAULT_SCOPE_CLAIMS = ("scope", "scp")


def scopes_of(claims: Mapping[str, Any], claim: str | None = None) -> frozenset[str]:
    """Scopes from `claim` when given, else from `scope` and `scp`; each a space-separated string or a list of strings.

    A string splits on the space character only (RFC 6749 §3.3): a tab or a no-break space is part of
    a scope, and a scope with such a character (or any other unprintable one) is dropped, never split
    into scopes the issuer did not grant.
    """
    scopes: set[str] = set()
    for name in (claim,) if claim else _DEFAULT_SCOPE_CLAIMS:
        value = claims.get(name)
        if isinstance(value, str):
            scopes.update(value.split(" "))
        elif isinstance(value, list):
            scopes.update(item for item in value if isinstance(item, str) and " " not in item)
    return frozenset(scope for scope in scopes if scope and scope.isprintable())


class _IssuerKeys:
    """How one configured issuer's signatures are checked."""

    def __init__(self, issuer: Issuer, jwks: JwksKeys | None):
        self.issuer = issuer
        self.algorithms = issuer.allowed_algorithms
        self.jwks = jwks
        self.static_key: Any = None
        if issuer.publicKey:
            try:
                self.static_key = load_pem_public_key(issuer.publicKey.encode())
            except ValueError as exc:
                raise PolicyError(f"auth issuer {issuer.issuer!r}: publicKey is not a usable PEM public key: {exc}") from None
        elif issuer.is_hmac:
            self.static_key = issuer.resolve_secret()

    async def key_for(self, header: Mapping[str, Any]) -> Any:
        alg = header.get("alg")
        if self.jwks is None:
            return self.static_key
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed token header")
        try:
            jwk = await self.jwks.key(kid)
        except JwksUnavailable as exc:
            log.warning("cannot verify a token of %s: %s", self.issuer.issuer, exc)
            raise InvalidToken("signing keys of the issuer are unavailable") from None
        if jwk is None:
            raise InvalidToken("unknown signing key")
        if jwk.key_type != _KEY_TYPE.get(str(alg)[:2]):
            raise InvalidToken("signing key does not match the token's algorithm")
        return jwk.key


class TokenVerifier:
    """Verifies bearer tokens against the policy's issuers; remembers verified tokens (by SHA-256) until they expire."""

    def __init__(
        self,
        auth: AuthPolicy,
        jwks_for: Callable[[Issuer], JwksKeys],
        *,
        clock: Callable[[], float] = time.time,
    ):
        self.auth = auth
        self._issuers = {
            item.issuer: _IssuerKeys(item, jwks_for(item) if item.jwksUrl else None) for item in auth.issuers
        }
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[Caller, float]] = OrderedDict()
        self._cache_size = auth.tokenCacheSize
        self.verifications = 0
        """Signature checks done (cache misses)."""

    async def verify(self, token: str) -> Caller:
        """The caller a token proves; InvalidToken when it proves nothing."""
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("malformed token")
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            caller, valid_until = cached
            if self._clock() < valid_until:
                self._cache.move_to_end(digest)
                return caller
            del self._cache[digest]
        caller, valid_until = await self._verify(token)
        if self._cache_size:
            self._cache[digest] = (caller, valid_until)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return caller

    async def _verify(self, token: str) -> tuple[Caller, float]:
        self.verifications += 1
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        iss = unverified.get("iss")
        keys = self._issuers.get(iss) if isinstance(iss, str) else None
        if keys is None:
            raise InvalidToken("untrusted issuer")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in keys.algorithms:
            # Checked before any key is chosen: `none` and HS256-with-a-public-key never reach a verifier.
            raise InvalidToken("signature algorithm not allowed")
        key = await keys.key_for(header)
        issuer = keys.issuer
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=issuer.audiences,
                issuer=issuer.issuer,
                leeway=issuer.leewaySeconds,
                options={"require": REQUIRED_CLAIMS, "verify_iat": False},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("token not meant for this server (audience)") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("untrusted issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"token lacks the {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.PyJWTError:
            raise InvalidToken("invalid token") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("token lacks the sub claim")
        if not subject.isprintable():
            # It travels upstream in a header and into audit lines.
            raise InvalidToken("token subject has control characters")
        exp = float(claims["exp"])  # pyjwt has checked it is a number
        caller = Caller(subject=subject, scopes=scopes_of(claims, issuer.scopeClaim), issuer=issuer.issuer, expires_at=exp)
        return caller, exp + issuer.leewaySeconds
