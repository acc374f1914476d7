"""A test token issuer: RSA, EC and HMAC keys, JWTs with chosen claims (and forged ones), and a JWKS served over loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from helpers import free_port

AUDIENCE = "toolmesh"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """One issuer with an RSA key (kid "rsa-1"), an EC P-256 key (kid "ec-1") and an HMAC secret."""

    def __init__(self, issuer: str = "https://issuer.test", audience: str = AUDIENCE, secret: str | None = None):
        self.issuer = issuer
        self.audience = audience
        self.secret = secret or uuid.uuid4().hex * 2
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.rsa_kid = "rsa-1"
        self.ec_kid = "ec-1"

    def hmac_auth(self) -> dict[str, Any]:
        """The policy's `auth` section trusting this issuer's HMAC secret."""
        return {"issuers": [{"issuer": self.issuer, "audiences": [self.audience], "secret": self.secret}]}

    # -- keys -----------------------------------------------------------------

    def public_pem(self, kind: str = "rsa") -> str:
        """The RSA or EC public key as PEM."""
        key = self.rsa_key if kind == "rsa" else self.ec_key
        return key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def jwks(self) -> dict[str, Any]:
        """The public keys as a JWKS document."""
        rsa_jwk = json.loads(RSAAlgorithm.to_jwk(self.rsa_key.public_key()))
        rsa_jwk.update(kid=self.rsa_kid, use="sig", alg="RS256")
        ec_jwk = json.loads(ECAlgorithm.to_jwk(self.ec_key.public_key()))
        ec_jwk.update(kid=self.ec_kid, use="sig", alg="ES256")
        return {"keys": [rsa_jwk, ec_jwk]}

    def rotate_rsa(self, kid: str) -> None:
        """A new RSA key under a new kid (the old one is gone from the JWKS)."""
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_kid = kid

    # -- tokens ---------------------------------------------------------------

    def claims(self, subject: str = "alice", scopes: str | list[str] | None = None, ttl: float = 300, **extra: Any) -> dict[str, Any]:
        """Valid claims for this issuer; `scopes` as a string goes to `scope`, as a list to `scp`."""
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "sub": subject, "iat": now, "exp": now + int(ttl)}
        if isinstance(scopes, str):
            claims["scope"] = scopes
        elif scopes is not None:
            claims["scp"] = list(scopes)
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, subject: str = "alice", scopes: str | list[str] | None = None, *, alg: str = "RS256",
              kid: str | None = "default", ttl: float = 300, header: dict[str, Any] | None = None, **extra: Any) -> str:
        """A signed token. alg RS256/ES256 use the issuer's keys (kid defaults to theirs), HS256 the secret."""
        claims = self.claims(subject, scopes, ttl, **extra)
        headers: dict[str, Any] = dict(header or {})
        if alg.startswith(("RS", "PS")):
            key: Any = self.rsa_key
            if kid == "default":
                kid = self.rsa_kid
        elif alg.startswith("ES"):
            key = self.ec_key
            if kid == "default":
                kid = self.ec_kid
        else:
            key = self.secret
            if kid == "default":
                kid = None
        if kid is not None:
            headers["kid"] = kid
        return jwt.encode(claims, key, algorithm=alg, headers=headers)

    # -- forgeries --------------------------------------------------------------

    def unsigned_token(self, subject: str = "mallory", scopes: str = "mcp:admin") -> str:
        """`alg: none` with an empty signature."""
        header = {"alg": "none", "typ": "JWT", "kid": self.rsa_kid}
        body = self.claims(subject, scopes)
        return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}."

    def hs256_with_public_key(self, subject: str = "mallory", scopes: str = "mcp:admin") -> str:
        """HS256 whose HMAC key is the RSA public key PEM (the algorithm-confusion attack), signed by hand."""
        header = {"alg": "HS256", "typ": "JWT", "kid": self.rsa_kid}
        body = self.claims(subject, scopes)
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}"
        signature = hmac.new(self.public_pem("rsa").encode(), signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(signature)}"


def tampered(token: str, **changes: Any) -> str:
    """The token with its payload changed (e.g. more scopes) and the original signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


class JwksServer:
    """Serves an issuer's JWKS at http://127.0.0.1:<port>/jwks.json from a background thread; counts fetches."""

    def __init__(self, issuer: TokenIssuer):
        self.issuer = issuer
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/jwks.json"
        self.fetches = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()

    async def _serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response(self.issuer.jwks())

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/jwks.json", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(self._runner.setup())
        loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def __enter__(self) -> JwksServer:
        self._thread = threading.Thread(target=self._run, name="jwks-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("JWKS server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
