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

import asyncio
import hashlib
import logging
import secrets
from collections import deque
from collections.abc import Hashable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

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


class Script:
    """A Lua script and its SHA1, as EVALSHA names it."""

    def __init__(self, text: str):
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


class Batches:
    """Every command goes out on one connection of its own, pipelined, as ioredis's auto-pipelining does: what
    the calls queue in one turn of the event loop is written at once, and one reader hands the replies back in
    order. Under load the calls of 64 connections cost a few writes and reads in all; a command costs a future,
    no task, no pool checkout; a caller that need not wait (a budget charge) just does not await it.

    The connection is redis-py's (its RESP encoder and parser, auth, TLS); a reply that does not come within
    `timeout` fails everything in flight and the next command connects again."""

    def __init__(self, client: aioredis.Redis, timeout: float):
        self._client = client
        self._timeout = timeout
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future]] = []
        self._waiting: deque[tuple[tuple[Any, ...], asyncio.Future]] = deque()
        self._queued = asyncio.Event()
        self._in_flight = asyncio.Event()
        self._connection: Any = None
        self._tasks: list[asyncio.Task] = []
        self._scripts: dict[str, str] = {}
        self._loading: set[str] = set()
        """Scripts a SCRIPT LOAD is on its way for."""
        self._resent: set[asyncio.Future] = set()
        """Commands sent again after NOSCRIPT: a second NOSCRIPT fails them."""
        self._closing = False

    def command(self, *args: Any) -> asyncio.Future:
        """The reply to one command (an error reply, or a lost connection, fails the future)."""
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._write()), loop.create_task(self._read())]
        future = asyncio.get_running_loop().create_future()
        self._pending.append((args, future))
        self._queued.set()
        return future

    def script(self, script: Script, keys: list[str], args: list[Any]) -> asyncio.Future:
        """A Lua script by its SHA; loaded and sent again where the server does not know it (restarted)."""
        self._scripts[script.sha] = script.text
        return self.command("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _write(self) -> None:
        while not self._closing:
            await self._queued.wait()
            self._queued.clear()
            batch, self._pending = self._pending, []
            try:
                if self._connection is None or not self._connection.is_connected:
                    if self._waiting:  # replies still owed on a connection that went away
                        await self._lost(RedisConnectionError("the connection to the store was lost"),
                                         connection=self._connection)
                    async with asyncio.timeout(self._timeout):
                        self._connection = await self._client.connection_pool.get_connection()
                connection = self._connection
                self._waiting.extend(batch)
                self._in_flight.set()
                async with asyncio.timeout(self._timeout):  # a server that stops reading fills the buffers
                    await connection.send_packed_command(connection.pack_commands([args for args, _ in batch]),
                                                         check_health=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever broke, the loop must live on for the next command
                _raise_if_cancelled()
                await self._lost(exc, batch, connection=self._connection)

    async def _read(self) -> None:
        while not self._closing:
            if not self._waiting:
                self._in_flight.clear()
                await self._in_flight.wait()
                continue
            connection = self._connection
            try:
                try:
                    # Not read_response's `timeout=`: when it expires, redis-py answers None as if a reply had come.
                    async with asyncio.timeout(self._timeout):
                        reply: Any = await connection.read_response()
                except ResponseError as exc:
                    reply = exc
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a closed, timed-out or broken connection alike
                _raise_if_cancelled()
                await self._lost(exc, connection=connection)
                continue
            args, future = self._waiting.popleft()
            resent = future in self._resent
            self._resent.discard(future)
            if future.done():
                continue  # its caller gave up
            if isinstance(reply, NoScriptError) and args[0] == "EVALSHA" and not resent:
                self._load_and_resend(args, future)
            elif isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _load_and_resend(self, args: tuple[Any, ...], future: asyncio.Future) -> None:
        """The server lacks the script (restarted, flushed): SCRIPT LOAD it on this connection, once for all the
        commands that need it, then the command again; FIFO order makes the load come first. Sent again once."""
        sha = args[1]
        if sha not in self._loading:
            self._loading.add(sha)
            load = self.command("SCRIPT", "LOAD", self._scripts[sha])
            load.add_done_callback(lambda done: (self._loading.discard(sha), done.cancelled() or done.exception()))
        self._resent.add(future)
        self._pending.append((args, future))
        self._queued.set()

    async def _lost(self, exc: BaseException, unsent: list[tuple[tuple[Any, ...], asyncio.Future]] = (), *,
                    connection: Any) -> None:
        """`connection` failed: everything in flight on it (and `unsent`) fails; the next command connects again.
        A failure reported late, of a connection already replaced, fails only `unsent`."""
        failure = exc if isinstance(exc, RedisError) else RedisConnectionError(f"{exc.__class__.__name__}: {exc}")
        for _, future in unsent:
            if not future.done():
                future.set_exception(failure)
        if connection is not self._connection:
            return
        self._connection = None
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(failure)
        self._waiting.clear()
        self._resent.clear()
        self._loading.clear()
        if connection is not None:
            await _drop(connection)

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for _, future in [*self._waiting, *self._pending]:
            if not future.done():
                future.set_exception(RedisConnectionError("the store is closing"))
        self._waiting.clear()
        self._pending = []
        connection, self._connection = self._connection, None
        if connection is not None:
            # Without waiting: a write cancelled half-way leaves the stream in no state to close politely.
            await _drop(connection)


def _raise_if_cancelled() -> None:
    """redis-py may turn a cancelled read into a timeout: a cancelled loop must still end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _drop(connection: Any) -> None:
    try:
        await connection.disconnect(nowait=True)
    except Exception:  # noqa: BLE001 - it is being dropped either way
        pass


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
        # The batches' connection has no socket timeout of its own: they bound each write and read themselves,
        # and redis-py would otherwise run every write as a task of its own (asyncio.wait_for).
        self._batch_client = aioredis.Redis.from_url(url, password=password, socket_timeout=None,
                                                     socket_connect_timeout=timeout, retry_on_timeout=False,
                                                     health_check_interval=0, max_connections=2)
        self._batches = Batches(self._batch_client, timeout)
        self._take = Script(_TAKE_TOKEN)
        self._take_quota = Script(_TAKE_QUOTA)
        self._add_quota = Script(_ADD_QUOTA)
        self._ledger_charge = Script(_LEDGER_CHARGE)

    async def take_token(self, key: Hashable, rate: float, burst: int) -> float:
        return float(await self._run(self._take, "rate:", key, repr(rate), burst))

    async def take_quota(self, key: Hashable, window: int, limit: int, amount: int) -> tuple[bool, float]:
        granted, reset = await self._run(self._take_quota, "quota:", key, window, limit, amount)
        return bool(int(granted)), float(reset)

    async def add_quota(self, key: Hashable, window: int, amount: int) -> None:
        await self._run(self._add_quota, "quota:", key, window, amount)

    async def _run(self, script: Script, kind: str, key: Hashable, *args: Any) -> Any:
        """One script on the server's key for `key` (this server's prefix, then `kind`); StoreUnavailable if it fails."""
        return await self._guarded(self._batches.script(script, [self.prefix + kind + orjson.dumps(key).decode()],
                                                        list(args)))

    # -- conversations (ConversationStore) --

    def _ledger_key(self, key: str) -> str:
        return f"{self.conversation_prefix}ledger:{digest(key)}"

    def _result_key(self, result_id: str) -> str:
        return f"{self.conversation_prefix}result:{result_id}"

    async def ledger_used(self, key: str) -> int:
        return int(await self._guarded(self._batches.command("GET", self._ledger_key(key))) or 0)

    async def ledger_charge(self, key: str, tokens: int, ttl: float) -> int:
        return int(await self._guarded(self.ledger_charge_soon(key, tokens, ttl)))

    def ledger_charge_soon(self, key: str, tokens: int, ttl: float) -> asyncio.Future:
        """`ledger_charge` queued now, its reply (the raw total) in the future: for a caller that need not wait."""
        return self._batches.script(self._ledger_charge, [self._ledger_key(key)], [tokens, max(int(ttl * 1000), 1)])

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
        await self._batches.close()
        await self._batch_client.aclose()
        await self._client.aclose()
