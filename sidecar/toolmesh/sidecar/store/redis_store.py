"""A Redis-protocol store (Redis 7, Valkey): every replica of a server shares its buckets.

Each operation is one Lua script, run atomically by the server with the server's own clock (`TIME`), so a call
costs one round trip and replicas never race or disagree about time. Rate buckets and quota counts are a
server's: their keys are `toolmesh:<namespace>/<server>:…` and expire once a bucket would be full again, so the
store holds only what is in use. Conversation ledgers and stored results span the servers of a namespace:
`toolmesh:<namespace>:ledger:<digest>` and `toolmesh:<namespace>:result:<id>`, where the digest hides the
subject and budget key the ledger is named by. The password comes from the environment (a Kubernetes Secret),
never the URL flag.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Hashable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from toolmesh.sidecar.store.base import StoredPage, StoreUnavailable, digest

log = logging.getLogger("toolmesh.sidecar.store")

_TAKE_TOKEN = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens = tonumber(bucket[1])
local at = tonumber(bucket[2])
if tokens == nil then
  tokens = burst
else
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return tostring(wait)
"""


# A quota's count lives under `<key>@<start of its window>`, which expires a minute after the window ends:
# `counted` is {that key, seconds until the window resets}.
_WINDOW = """
local window = tonumber(ARGV[1])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local start = math.floor(now / window) * window
local counted = {KEYS[1] .. '@' .. string.format('%d', start), start + window - now}
"""
_TAKE_QUOTA = _WINDOW + """
local limit = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local used = tonumber(redis.call('GET', counted[1]) or '0')
if used + math.max(amount, 1) > limit then
  return {0, tostring(counted[2])}
end
if amount ~= 0 then
  redis.call('INCRBY', counted[1], amount)
  redis.call('EXPIRE', counted[1], window + 60)
end
return {1, tostring(counted[2])}
"""
_ADD_QUOTA = _WINDOW + """
redis.call('INCRBY', counted[1], tonumber(ARGV[2]))
redis.call('EXPIRE', counted[1], window + 60)
return 1
"""

_LEDGER_CHARGE = """
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return used
"""


class RedisStore:
    """The shared store on a Redis-protocol server at `url` (`redis://`, `rediss://` for TLS, `unix://`)."""

    name = "redis"

    def __init__(self, url: str, namespace: str, server: str, *, password: str | None = None,
                 timeout: float = 0.5):
        self.url = url
        self.prefix = f"toolmesh:{namespace}/{server}:"
        """A server's own keys (rate buckets, quota counts)."""
        self.conversation_prefix = f"toolmesh:{namespace}:"
        """Keys every server of the namespace shares (ledgers, stored results)."""
        # A store that hangs would hang every call behind it: each command gets `timeout` seconds, then the
        # stage's onStoreError decides. No retries here: the caller's call is waiting.
        self._client = aioredis.Redis.from_url(url, password=password, socket_timeout=timeout,
                                               socket_connect_timeout=timeout, retry_on_timeout=False,
                                               health_check_interval=0, max_connections=256)
        self._take = self._client.register_script(_TAKE_TOKEN)
        self._take_quota = self._client.register_script(_TAKE_QUOTA)
        self._add_quota = self._client.register_script(_ADD_QUOTA)
        self._ledger_charge = self._client.register_script(_LEDGER_CHARGE)

    async def take_token(self, key: Hashable, rate: float, burst: int) -> float:
        return float(await self._run(self._take, "rate:", key, repr(rate), burst))

    async def take_quota(self, key: Hashable, window: int, limit: int, amount: int) -> tuple[bool, float]:
        granted, reset = await self._run(self._take_quota, "quota:", key, window, limit, amount)
        return bool(int(granted)), float(reset)

    async def add_quota(self, key: Hashable, window: int, amount: int) -> None:
        await self._run(self._add_quota, "quota:", key, window, amount)

    async def _run(self, script: Any, kind: str, key: Hashable, *args: Any) -> Any:
        """One script on the server's key for `key` (this server's prefix, then `kind`); StoreUnavailable if it fails."""
        return await self._guarded(script(keys=[self.prefix + kind + orjson.dumps(key).decode()], args=list(args)))

    # -- conversations (ConversationStore) --

    def _ledger_key(self, key: str) -> str:
        return f"{self.conversation_prefix}ledger:{digest(key)}"

    def _result_key(self, result_id: str) -> str:
        return f"{self.conversation_prefix}result:{result_id}"

    async def ledger_used(self, key: str) -> int:
        return int(await self._guarded(self._client.get(self._ledger_key(key))) or 0)

    async def ledger_charge(self, key: str, tokens: int, ttl: float) -> int:
        return int(await self._guarded(self._ledger_charge(keys=[self._ledger_key(key)],
                                                           args=[tokens, max(int(ttl * 1000), 1)])))

    async def ledger_forget(self, key: str) -> None:
        await self._guarded(self._client.delete(self._ledger_key(key)))

    async def put_result(self, result_id: str, owner: str, pages: list[str], tokens: int, ttl: float) -> None:
        fields: dict[str, Any] = {"owner": digest(owner), "tokens": tokens, "pages": len(pages)}
        fields.update({f"p{number}": text for number, text in enumerate(pages, 1)})
        key = self._result_key(result_id)
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, max(int(ttl * 1000), 1))
        await self._guarded(pipe.execute())

    async def read_result(self, result_id: str, owner: str, number: int) -> StoredPage | None:
        stored_owner, tokens, count, text = await self._guarded(
            self._client.hmget(self._result_key(result_id), "owner", "tokens", "pages", f"p{number}"))
        if stored_owner is None or text is None or not secrets.compare_digest(stored_owner, digest(owner).encode()):
            return None
        return StoredPage(text.decode(), int(count), int(tokens))

    async def _guarded(self, pending: Any) -> Any:
        """The answer to one round trip; StoreUnavailable if the server did not give it."""
        try:
            return await pending
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{self.url_for_logs}: {exc.__class__.__name__}: {exc}") from None

    @property
    def url_for_logs(self) -> str:
        """The URL without credentials a user may have put in it after all."""
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    async def close(self) -> None:
        await self._client.aclose()
