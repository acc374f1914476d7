"""An issuer's signing keys from its JWKS URL: fetched over HTTP, cached, re-fetched on an unknown `kid` at a bounded rate."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
import orjson
from jwt import PyJWK, PyJWKSet
from jwt.exceptions import PyJWKSetError, PyJWTError

log = logging.getLogger("toolmesh.sidecar.jwks")

MAX_JWKS_BYTES = 1 << 20
"""A JWKS larger than this is refused (a real one is a few kB)."""


class JwksUnavailable(Exception):
    """The JWKS could not be fetched or parsed; tokens signed by its keys cannot be verified now."""


class JwksKeys:
    """The keys behind one JWKS URL."""

    def __init__(
        self,
        url: str,
        *,
        cache_seconds: float = 300,
        min_refresh_seconds: float = 10,
        fetch_timeout: float = 5,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.url = url
        self.cache_seconds = cache_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self.fetch_timeout = fetch_timeout
        self._clock = clock
        self._keys: dict[str | None, PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0
        """HTTP fetches made (successful or not)."""

    async def key(self, kid: str | None) -> PyJWK | None:
        """The key for `kid` (or the only key when the token names none); None when the issuer has no such key."""
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at >= self.cache_seconds:
            await self._refresh()
        found = self._lookup(kid)
        if found is None and self._may_refresh():
            # An unknown kid usually means the issuer rotated its keys since the last fetch.
            await self._refresh()
            found = self._lookup(kid)
        return found

    def _lookup(self, kid: str | None) -> PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        if len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return None

    def _may_refresh(self) -> bool:
        return self._attempted_at is None or self._clock() - self._attempted_at >= self.min_refresh_seconds

    async def _refresh(self) -> None:
        async with self._lock:
            # Another call may have fetched while this one waited for the lock; a flood of
            # tokens with made-up kids must not turn into a flood of fetches either.
            if not self._may_refresh():
                if self._fetched_at is None:
                    raise JwksUnavailable(f"{self.url} could not be fetched; next attempt in at most {self.min_refresh_seconds}s")
                return
            self._attempted_at = self._clock()
            self.fetches += 1
            try:
                keys = await self._fetch()
            except JwksUnavailable as exc:
                if self._fetched_at is None:
                    raise
                log.warning("keeping the cached JWKS of %s: %s", self.url, exc)
                return
            self._keys = keys
            self._fetched_at = self._clock()

    async def _fetch(self) -> dict[str | None, PyJWK]:
        timeout = aiohttp.ClientTimeout(total=self.fetch_timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(self.url, headers={"Accept": "application/json"}) as resp:
                    if resp.status != 200:
                        raise JwksUnavailable(f"GET {self.url} answered HTTP {resp.status}")
                    body = await resp.content.read(MAX_JWKS_BYTES + 1)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise JwksUnavailable(f"GET {self.url} failed: {exc!r}") from None
        if len(body) > MAX_JWKS_BYTES:
            raise JwksUnavailable(f"{self.url} is larger than {MAX_JWKS_BYTES} bytes")
        try:
            data = orjson.loads(body)
            key_set = PyJWKSet.from_dict(data if isinstance(data, dict) else {})
        except (orjson.JSONDecodeError, PyJWKSetError, PyJWTError) as exc:
            raise JwksUnavailable(f"{self.url} is not a usable JWKS: {exc}") from None
        keys: dict[str | None, PyJWK] = {}
        for jwk in key_set.keys:
            if jwk.public_key_use not in (None, "sig"):
                continue
            keys[jwk.key_id] = jwk
        if not keys:
            raise JwksUnavailable(f"{self.url} has no signing keys")
        return keys
