"""Fronts a server on the legacy HTTP+SSE transport (GET /sse, POST /messages) as a Streamable HTTP upstream.

    LegacySseUpstream(url, session=None, *, timeout=300.0, connect_timeout=5.0,
                      reconnect_backoff=(0.2, 5.0), reconnect_wait=10.0, resume_grace=30.0,
                      session_idle_timeout=1800.0, max_sessions=10_000)
        `url` is the server's SSE endpoint (e.g. http://host:8000/sse);
        `session` an aiohttp client session to share (one is made otherwise);
        `timeout` bounds each message POST and the silence on a request before
        JSON-RPC error -32002 (504; progress resets it); `connect_timeout`
        bounds opening the stream and receiving its `endpoint` event;
        `resume_grace` is how long a call whose client lost its SSE stream
        keeps running for a GET with Last-Event-ID before it is cancelled.
        Sessions are swept and capped as on the stdio bridge: one unused for
        `session_idle_timeout` seconds with nothing in flight and no stream
        open is closed by a timer; at `max_sessions` an `initialize` closes the
        least recently used such session, or gets HTTP 503.

Each client session gets an upstream SSE connection of its own: the client's
`initialize` opens it (GET `url`, whose first event, `endpoint`, names the
POST URL `/messages?session_id=…`), is forwarded there, and its answer carries
a fresh, unguessable `Mcp-Session-Id` minted by the adapter. Every client message is then
POSTed to that URL (the server answers 202) and every answer arrives on the
stream, where the `Multiplexer` matches it to the waiting request by id;
progress, server requests and logging during a request go out on that
request's response stream, other notifications on the session's GET stream.

When a stream is lost (server restart, network), requests in flight fail with
JSON-RPC error -32001 "upstream stream lost", and the adapter reconnects with
backoff and replays the client's `initialize` (and `notifications/initialized`)
so the session carries on; requests arriving meanwhile wait up to
`reconnect_wait`. Requests without `Mcp-Session-Id` and `probe()` share one
connection the adapter initializes itself; 2026-07-28 requests get another,
opened with `server/discover`, when the server serves that era, and otherwise
go on the adapter's own connection without the era's envelope, their answers
reshaped for that era.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urljoin

import aiohttp

from toolmesh.api.mcp_http import SseEvent, iter_sse
from toolmesh.sidecar.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from toolmesh.sidecar.transports.base import UpstreamResponse
from toolmesh.sidecar.transports.bridge import Channel, MessageBridge
from toolmesh.sidecar.transports.channel import Multiplexer
from toolmesh.sidecar.transports.sessions import ClientSession
from toolmesh.sidecar.transports.stateless import ToolSchemas, discover_params, serves_stateless_era

log = logging.getLogger("toolmesh.sidecar.legacy_sse")

_OWN_INITIALIZE = {
    "protocolVersion": "2024-11-05",
    "capabilities": {},
    "clientInfo": {"name": "toolmesh-sidecar", "version": "0.1.0"},
}
"""What the adapter's own connection (probes, session-less requests) says when it initializes."""
_MESSAGE_HEADERS = {"Content-Type": "application/json"}
# The client's headers that describe its own HTTP exchange with the sidecar, not the message.
_NOT_RELAYED = frozenset({"content-type", "content-length", "accept", "host", "mcp-session-id", "last-event-id",
                          "mcp-protocol-version"})
_client_headers: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "toolmesh_legacy_sse_client_headers", default=None)
"""Headers of the client request being served in this task (the pipeline already chose what goes upstream)."""


def _message_headers() -> dict[str, str]:
    headers = _client_headers.get()
    if not headers:
        return dict(_MESSAGE_HEADERS)
    relayed = {k: v for k, v in headers.items() if k.lower() not in _NOT_RELAYED}
    relayed.update(_MESSAGE_HEADERS)
    return relayed


class _Connection:
    """One upstream SSE stream and its message endpoint, carrying one client session (or the adapter's own)."""

    def __init__(self, owner: LegacySseUpstream, init_params: Mapping[str, Any] | None, *, stateless: bool = False):
        self._owner = owner
        self.stateless = stateless
        """True for the connection settled in the stateless era by a server/discover (no session, no initialize)."""
        self.mux = Multiplexer(self._post_message, timeout=owner.silence_timeout, resume_grace=owner.resume_grace)
        self.mux.resumable = owner.resumable
        self.schemas = ToolSchemas(self.mux, owner.connect_timeout)
        self.init_params = init_params
        """The `initialize` params replayed after a reconnect (None until the session is established)."""
        self.session: ClientSession | None = None
        self.endpoint: str | None = None
        self.ready = asyncio.Event()
        self._response: aiohttp.ClientResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self.closed = False

    async def connect(self) -> None:
        """Open the SSE stream and learn where to POST; raises UpstreamUnavailable."""
        owner = self._owner
        try:
            response = await owner.http.get(owner.url, headers={"Accept": "text/event-stream"},
                                            timeout=owner.stream_timeout)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"upstream unreachable: {exc.__class__.__name__}") from None
        if response.status != 200:
            response.close()
            raise UpstreamUnavailable(f"upstream SSE endpoint answered HTTP {response.status}")
        events = iter_sse(response.content.iter_any())
        try:
            endpoint = await asyncio.wait_for(_endpoint_event(events), owner.connect_timeout)
        except (TimeoutError, aiohttp.ClientError, ValueError, StopAsyncIteration) as exc:
            response.close()
            raise UpstreamUnavailable(f"upstream sent no endpoint event: {exc.__class__.__name__}") from None
        self.endpoint = urljoin(owner.url, endpoint)
        self._response = response
        # A fresh context: the stream outlives the client request that opened it, and must not carry its headers.
        self._reader = asyncio.create_task(self._read(events, response), context=contextvars.Context())

    async def _read(self, events: AsyncIterator[SseEvent], response: aiohttp.ClientResponse) -> None:
        try:
            async for event in events:
                if event.event in (None, "message"):
                    self.mux.receive(event.data)
        except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
            log.warning("upstream SSE stream broke: %s", exc.__class__.__name__)
        finally:
            # Only the current stream's end counts: an older one may finish after a reconnect replaced it.
            if not self.closed and self._response is response:
                self._lost()

    def _lost(self) -> None:
        self.ready.clear()
        self.endpoint = None
        if self._response is not None:
            self._response.close()
        self.mux.fail_all(UpstreamUnavailable("upstream stream lost"))
        if (self.init_params is not None or self.stateless) and not self.closed and self._reconnecting is None:
            log.warning("upstream SSE stream lost; reconnecting")
            self._reconnecting = asyncio.create_task(self._reconnect(), context=contextvars.Context())

    async def _reconnect(self) -> None:
        base, most = self._owner.reconnect_backoff
        delay = base
        try:
            while not self.closed:
                try:
                    await self.connect()
                    await self.handshake()
                except ProxyError as exc:
                    log.info("reconnecting to the upstream SSE stream failed: %s", exc.message)
                    self._drop_stream()
                    await asyncio.sleep(delay)  # backoff between attempts, not synchronisation
                    delay = min(most, delay * 2)
                    continue
                self.ready.set()
                log.info("upstream SSE stream re-established")
                return
        finally:
            self._reconnecting = None

    async def handshake(self) -> None:
        """The connection's own opening (after a reconnect, or for the adapter's own connections)."""
        if self.stateless:
            answer = await self.mux.call_own("server/discover", discover_params(_OWN_INITIALIZE["clientInfo"]),
                                             self._owner.connect_timeout)
            if not serves_stateless_era(answer):
                raise NoStatelessEra("upstream does not serve the 2026-07-28 protocol", data=answer.get("error"))
            return
        answer = await self.mux.call_own("initialize", self.init_params, self._owner.connect_timeout)
        if "result" not in answer:
            raise UpstreamUnavailable("upstream refused initialize", data=answer.get("error"))
        await self.mux.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def _drop_stream(self) -> None:
        """Close the current stream; its reader then reports the loss (and a reconnect starts if none runs)."""
        if self._response is not None:
            self._response.close()

    async def _post_message(self, data: bytes) -> None:
        endpoint = self.endpoint
        if endpoint is None:
            raise UpstreamUnavailable("upstream stream lost")
        owner = self._owner
        try:
            async with owner.http.post(endpoint, data=data, headers=_message_headers(),
                                       timeout=owner.message_timeout) as response:
                if response.status < 300:
                    return
                text = (await response.text())[:200]
        except TimeoutError:
            raise UpstreamTimeout("upstream did not accept the message in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(f"upstream unreachable: {exc.__class__.__name__}") from None
        if response.status == 404 and self.endpoint == endpoint and not self.closed:
            # The server forgot this stream's session (it restarted): start over.
            self._drop_stream()
        raise UpstreamUnavailable(f"upstream refused the message: HTTP {response.status}",
                                  data={"status": response.status, "body": text})

    async def wait_ready(self) -> None:
        """Return once the stream is up; a lost one gets `reconnect_wait` seconds to come back."""
        if self.ready.is_set():
            return
        try:
            await asyncio.wait_for(self.ready.wait(), self._owner.reconnect_wait)
        except TimeoutError:
            raise UpstreamUnavailable("upstream stream lost") from None

    async def close(self) -> None:
        self.closed = True
        self.ready.clear()
        for task in (self._reader, self._reconnecting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._response is not None:
            self._response.close()
        self.mux.fail_all(UpstreamUnavailable("upstream session ended"))
        self.mux.end_streams()


class NoStatelessEra(UpstreamUnavailable):
    """The server answers only in the session era; stateless-era requests then go where session-era ones go."""


async def _endpoint_event(events: AsyncIterator[SseEvent]) -> str:
    async for event in events:
        if event.event == "endpoint":
            return event.data.decode().strip()
    raise StopAsyncIteration


class LegacySseUpstream(MessageBridge):
    """An `Upstream` for a server speaking the 2024-11-05 HTTP+SSE transport: one connection per client session."""

    def __init__(self, url: str, session: aiohttp.ClientSession | None = None, *, timeout: float = 300.0,
                 connect_timeout: float = 5.0, reconnect_backoff: tuple[float, float] = (0.2, 5.0),
                 reconnect_wait: float = 10.0, max_connections: int = 256, session_idle_timeout: float = 1800.0,
                 resume_grace: float = 30.0, max_sessions: int = 10_000):
        super().__init__(max_sessions=max_sessions, session_idle_timeout=session_idle_timeout)
        self.url = url
        self.resume_grace = resume_grace
        self._given_session = session
        self._http: aiohttp.ClientSession | None = session
        self.message_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self.silence_timeout = timeout
        # The stream may rightly stay silent for hours.
        self.stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=None)
        self.connect_timeout = connect_timeout
        self.reconnect_backoff = reconnect_backoff
        self.reconnect_wait = reconnect_wait
        self._max_connections = max_connections
        self._opening = 0
        self._connections: dict[str, _Connection] = {}
        self._own: _Connection | None = None
        self._own_lock = asyncio.Lock()
        self._stateless: _Connection | None = None
        self._no_stateless_era = False

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise UpstreamUnavailable("upstream is not started")
        return self._http

    # -- Upstream ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._http is None:
            # Every session holds one connection for its /sse stream: messages get `max_connections` beyond them,
            # so sessions up to the cap can never leave a POST waiting for a free connection.
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_sessions + self._max_connections))
        self._start_sweeper()

    async def close(self) -> None:
        await self._stop_sweeper()
        connections = list(self._connections.values())
        self._connections.clear()
        for own in (self._own, self._stateless):
            if own is not None:
                connections.append(own)
        self._own = self._stateless = None
        for connection in connections:
            await connection.close()
        if self._given_session is None and self._http is not None:
            await self._http.close()
        self._http = None

    async def post(self, body: bytes, headers: Mapping[str, str], message: Any = None) -> UpstreamResponse:
        _client_headers.set(headers)  # the message POSTs this request causes carry them (identity, trace context)
        return await super().post(body, headers, message)

    async def probe(self) -> bool:
        try:
            connection = await self._own_channel()
            await connection.wait_ready()
            answer = await connection.mux.call_own("ping", None, self.connect_timeout)
        except ProxyError:
            return False
        return "result" in answer

    # -- the bridge's channels: a connection per session, the adapter's own, one for the stateless era ----------

    def _session(self, session_id: str) -> tuple[Channel, ClientSession] | None:
        connection = self._connections.get(session_id)
        if connection is None or connection.session is None:
            return None
        return connection, connection.session

    def _sessions(self) -> list[tuple[Channel, ClientSession]]:
        return [(c, c.session) for c in self._connections.values() if c.session is not None]

    def _session_count(self) -> int:
        return len(self._connections) + self._opening

    def _muxes(self) -> list[Multiplexer]:
        return [c.mux for c in (*self._connections.values(), self._own, self._stateless) if c is not None]

    async def _new_session(self, message: dict[str, Any], body: bytes | None) -> UpstreamResponse:
        self._opening += 1  # (a slot held while the stream opens, so concurrent initializes stay within the cap)
        try:
            return await self._connect_session(message, body)
        finally:
            self._opening -= 1

    async def _end_session(self, channel: Channel, session: ClientSession) -> None:
        if self._connections.get(session.id) is channel:
            del self._connections[session.id]
        await channel.mux.end_session(session)
        await channel.close()  # closing the stream ends the session upstream

    async def _connect_session(self, message: dict[str, Any], body: bytes | None) -> UpstreamResponse:
        connection = _Connection(self, None)
        await connection.connect()
        session = connection.mux.new_session(message.get("params"))
        connection.session = session
        connection.ready.set()
        try:
            answer = await connection.mux.post(message, session, body)
        except BaseException:
            await connection.close()
            raise
        if answer.status != 200 or (answer.body is not None and b'"result"' not in answer.body):
            await connection.close()
            return answer
        params = message.get("params")
        connection.init_params = params if isinstance(params, Mapping) else {}
        self._connections[session.id] = connection
        answer.headers = {**answer.headers, "Mcp-Session-Id": session.id}
        return answer

    async def _own_channel(self) -> _Connection:
        """The adapter's session-era connection, for probes and session-less requests."""
        async with self._own_lock:
            if self._own is None or self._own.closed:
                self._own = await self._open_own(_Connection(self, _OWN_INITIALIZE))
            return self._own

    async def _stateless_channel(self) -> _Connection | None:
        """A connection settled in the stateless era (a server serves one era per connection), if the server has it."""
        async with self._own_lock:
            if self._no_stateless_era:
                return None
            if self._stateless is None or self._stateless.closed:
                try:
                    self._stateless = await self._open_own(_Connection(self, None, stateless=True))
                except NoStatelessEra:
                    log.info("the legacy SSE upstream does not serve the 2026-07-28 protocol")
                    self._no_stateless_era = True
                    return None
            return self._stateless

    @staticmethod
    async def _open_own(connection: _Connection) -> _Connection:
        await connection.connect()
        try:
            await connection.handshake()
        except BaseException:
            await connection.close()
            raise
        connection.ready.set()
        return connection
