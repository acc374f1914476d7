"""A lean HTTP/1.1 client for the hot paths: a sidecar to its upstream, the gateway to its sidecars.

Pooled keep-alive connections, JSON or streamed bodies. A general-purpose
client (aiohttp's) spends ~150 µs of CPU per request on things these paths never
need (cookie jars, URL objects, redirects, tracing hooks); this one writes the
request in one buffer and reads the answer with Content-Length, chunked or
close-delimited framing. One pool per URL, plain HTTP or TLS. Requests are never
re-sent: whether a failed call may be repeated is the caller's decision (the
sidecar's retry stage, the gateway's fail-over).
"""

from __future__ import annotations

import asyncio
import select
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Mapping
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
"""Largest response head (status line and headers) accepted."""
READ_LIMIT = 1024 * 1024
PREFETCH_BYTES = 256 * 1024
"""An answer with a Content-Length up to this size is read together with its head."""
MAX_IDLE = 64
"""Idle keep-alive connections kept; more are closed when they come back."""
MAX_IDLE_SECONDS = 4.0
"""An idle connection older than this is not reused: servers close theirs after a few seconds (uvicorn: 5),
and a request sent just as the server closes would fail for nothing."""
CHECK_IDLE_AFTER = 0.05
"""An idle connection older than this is checked for the server's close before a request goes on it: under load
connections come back within milliseconds and are reused without the system call."""


def _closed_by_peer(conn: Connection) -> bool:
    """True when an idle connection has something to read: the server's close (or bytes HTTP does not allow)."""
    sock = conn.writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class WireError(Exception):
    """The upstream broke HTTP: refused, closed mid-answer, or sent something that is not HTTP/1.x."""


class Connection:
    """One TCP (or TLS) connection to the upstream."""

    __slots__ = ("reader", "writer", "idle_since", "loop")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        # Kept rather than asked for per request: asyncio.get_running_loop() costs a getpid() system call.
        self.loop = asyncio.get_running_loop()

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing() and not self.reader.exception()

    def close(self) -> None:
        self.writer.close()


class WireResponse:
    """Status and headers of an answer; its body is read with `read()` or streamed with `chunks()`."""

    __slots__ = ("status", "headers", "_pool", "_conn", "_length", "_chunked", "_done", "_keep_alive", "_timeout",
                 "_body")

    def __init__(self, pool: WirePool, conn: Connection, status: int, headers: dict[str, str], *,
                 length: int | None, chunked: bool, keep_alive: bool, timeout: float | None):
        self.status = status
        self.headers = headers
        self._pool = pool
        self._conn: Connection | None = conn
        self._length = length
        self._chunked = chunked
        self._keep_alive = keep_alive
        self._timeout = timeout
        self._done = length == 0 and not chunked
        self._body: bytes | None = None
        """The whole body when it was read with the head."""

    @property
    def finished(self) -> bool:
        """True once the whole body has been read off the connection (which can then be reused)."""
        return self._done

    async def read(self) -> bytes:
        """The whole body."""
        body = self._body
        if body is not None:
            self._body = None
            self.release()
            return body
        if self._done:
            self.release()
            return b""
        conn = self._conn
        reader = conn.reader
        timer = self._arm(conn)
        try:
            if self._chunked:
                parts = [chunk async for chunk in self._chunk_stream(conn)]
                data = b"".join(parts)
            elif self._length is not None:
                data = await reader.readexactly(self._length)
            else:
                data = await reader.read()
        except TimeoutError:  # before OSError, of which it is a subclass
            self.close()
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise WireError(f"upstream closed mid-answer: {exc.__class__.__name__}") from None
        except BaseException:
            self.close()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        self._done = True
        self.release()
        return data

    def _arm(self, conn: Connection) -> asyncio.TimerHandle | None:
        """A timer failing the reads that follow with TimeoutError after the read timeout; cancel it when they are done.

        Cheaper than asyncio.timeout() on every call, and the same here: reads of this connection are the only waits.
        """
        timeout = self._timeout
        return None if timeout is None else conn.loop.call_later(timeout, _expire, conn.reader)

    async def _timed(self, conn: Connection, read: Awaitable[bytes]) -> bytes:
        timer = self._arm(conn)
        try:
            return await read
        finally:
            if timer is not None:
                timer.cancel()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; each read may wait at most the read timeout."""
        body = self._body
        if body is not None:
            self._body = None
            yield body
            return
        if self._done:
            return
        conn = self._conn
        reader = conn.reader
        try:
            if self._chunked:
                async for chunk in self._chunk_stream(conn, per_read=True):
                    yield chunk
            else:
                remaining = self._length
                while remaining is None or remaining > 0:
                    size = 65536 if remaining is None else min(65536, remaining)
                    chunk = await self._timed(conn, reader.read(size))
                    if not chunk:
                        if remaining is None:
                            break
                        raise WireError("upstream closed mid-answer")
                    if remaining is not None:
                        remaining -= len(chunk)
                    yield chunk
            self._done = True
        except TimeoutError:
            self.close()
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise WireError(f"upstream broke the stream: {exc.__class__.__name__}") from None

    async def _chunk_stream(self, conn: Connection, per_read: bool = False) -> AsyncIterator[bytes]:
        reader = conn.reader
        while True:
            if per_read:
                line = await self._timed(conn, reader.readuntil(b"\r\n"))
            else:
                line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # Trailers (rare) end with an empty line.
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                self._done = True
                return
            if per_read:
                data = await self._timed(conn, reader.readexactly(size + 2))
            else:
                data = await reader.readexactly(size + 2)
            yield data[:-2]

    def release(self) -> None:
        """Give the connection back if the body was read to the end, else close it (the upstream sees the client leave)."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if self._done and self._keep_alive:
            self._pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.close()


class WirePool:
    """Keep-alive connections to one upstream URL."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, ssl_context: ssl.SSLContext | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        host_header = parts.netloc.rsplit("@", 1)[-1]
        self._target = path.encode()
        self._host_line = b"Host: " + host_header.encode("idna") + b"\r\n"
        self.connect_timeout = connect_timeout
        self._idle: deque[Connection] = deque()
        self._closed = False

    async def _connect(self) -> Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=READ_LIMIT)
        except TimeoutError:
            raise
        except OSError as exc:
            raise WireError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        return Connection(reader, writer)

    def _take(self) -> Connection | None:
        """An idle connection the server has not closed, or None.

        A server closes an idle keep-alive connection when its own timer says so (uvicorn: 5 s, often less);
        the event loop may not have read that close yet when the next request takes the connection, and a
        request written into it would fail though the server never saw it. An idle connection older than
        `CHECK_IDLE_AFTER` is therefore looked at first (readable while idle means the server closed it, or
        broke HTTP). A request already written is never re-sent: the server may have acted on it.
        """
        idle = self._idle
        now = time.monotonic()
        fresh_after = now - MAX_IDLE_SECONDS
        checked_after = now - CHECK_IDLE_AFTER
        while idle:
            conn = idle.pop()
            if conn.idle_since >= fresh_after and conn.usable() and (
                    conn.idle_since >= checked_after or not _closed_by_peer(conn)):
                return conn
            conn.close()
        return None

    def put(self, conn: Connection) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE or not conn.usable():
            conn.close()
        else:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    def _head(self, method: bytes, headers: Mapping[str, str], body: bytes | None) -> bytes:
        text = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        if text.count("\n") != len(headers) or text.count("\r") != len(headers):
            # Never let a value split into a second header: such a header is left out.
            text = "".join([f"{name}: {value}\r\n" for name, value in headers.items()
                            if "\n" not in value and "\r" not in value and "\n" not in name and "\r" not in name])
        if body is not None:
            text += f"Content-Length: {len(body)}\r\n\r\n"
        else:
            text += "\r\n"
        head = b"".join((method, b" ", self._target, b" HTTP/1.1\r\n", self._host_line,
                         text.encode("utf-8", "surrogateescape")))
        return head + body if body else head

    async def request(self, method: str, headers: Mapping[str, str], body: bytes | None = None, *,
                      timeout: float | None = None) -> WireResponse:
        """Send one request; returns once the response head has arrived (within `timeout` seconds)."""
        payload = self._head(method.encode(), headers, body)
        conn = self._take()
        if conn is None:
            conn = await self._connect()
        # Never re-sent: a POST the upstream may have acted on is for the retry stage to judge (it knows
        # which tools are idempotent). Idle connections the upstream closed are weeded out by `_take`.
        return await self._exchange(conn, payload, method, timeout)

    async def _exchange(self, conn: Connection, payload: bytes, method: str, timeout: float | None) -> WireResponse:
        reader = conn.reader
        body: bytes | None = None
        # The timer fails the read it interrupts with TimeoutError: the same as asyncio.timeout() here (the
        # reads are this exchange's only waits), for a fraction of its cost on every call.
        timer = None if timeout is None else conn.loop.call_later(timeout, _expire, reader)
        try:
            conn.writer.write(payload)
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                status, headers, version = _parse_head(head)
                if status >= 200 or status == 101:
                    break
            connection = headers.get("connection")
            keep_alive = version == b"HTTP/1.1" and (connection is None or "close" not in connection.lower())
            encoding = headers.get("transfer-encoding")
            chunked = encoding is not None and "chunked" in encoding.lower()
            length: int | None = None
            if method == "HEAD" or status in (204, 304):
                length = 0
            elif not chunked:
                raw_length = headers.get("content-length")
                if raw_length is not None:
                    length = int(raw_length)
                    if 0 < length <= PREFETCH_BYTES and not headers.get("content-type", "").startswith(
                            "text/event-stream"):
                        # A small JSON answer (the usual JSON-RPC result) is read under the same timer
                        # as its head: one timer per exchange instead of two. Streams stay event by event.
                        body = await reader.readexactly(length)
                else:
                    keep_alive = False  # the body ends when the server closes
        except TimeoutError:  # before OSError, of which it is a subclass
            conn.close()
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, asyncio.LimitOverrunError) as exc:
            conn.close()
            raise WireError(f"upstream broke the connection: {exc.__class__.__name__}") from None
        except BaseException:
            conn.close()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        response = WireResponse(self, conn, status, headers, length=length, chunked=chunked, keep_alive=keep_alive,
                                timeout=timeout)
        if body is not None:
            response._body = body
            response._done = True  # off the socket: the connection is free again
        return response


def _expire(reader: asyncio.StreamReader) -> None:
    reader.set_exception(TimeoutError("upstream did not answer in time"))


def _parse_head(head: bytes) -> tuple[int, dict[str, str], bytes]:
    if len(head) > MAX_HEAD_BYTES:
        raise ValueError("response head too large")
    lines = head[:-4].decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    version = status_line[0]
    if not version.startswith("HTTP/1.") or len(status_line) < 2:
        raise ValueError("not an HTTP/1.x response")
    status = int(status_line[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("malformed header line")
        key = name.strip().lower()
        value = value.strip()
        # Repeated headers: keep them all, joined as HTTP allows (Set-Cookie aside, which MCP does not use).
        if key in headers:
            headers[key] += ", " + value
        else:
            headers[key] = value
    return status, headers, version.encode()


class Headers(dict):
    """Response headers (stored lower-case, as `WireResponse` has them) read by any spelling of their names."""

    def get(self, name: str, default=None):  # type: ignore[override]
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name.lower() if isinstance(name, str) else name)


class WireClient:
    """A `WirePool` per URL, for a client that talks to many endpoints (the gateway to its sidecars)."""

    def __init__(self, *, connect_timeout: float = 5.0, max_pools: int = 4096):
        self.connect_timeout = connect_timeout
        self.max_pools = max_pools
        self._pools: dict[str, WirePool] = {}

    def pool(self, url: str) -> WirePool:
        pool = self._pools.get(url)
        if pool is None:
            if len(self._pools) >= self.max_pools:  # endpoints come and go: drop the oldest pool's idle connections
                self._pools.pop(next(iter(self._pools))).close()
            pool = self._pools[url] = WirePool(url, connect_timeout=self.connect_timeout)
        return pool

    def forget(self, url: str) -> None:
        pool = self._pools.pop(url, None)
        if pool is not None:
            pool.close()

    async def request(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None, *,
                      timeout: float | None = None) -> WireResponse:
        return await self.pool(url).request(method, headers, body, timeout=timeout)

    def close(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()
