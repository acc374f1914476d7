"""The gateway's MCP client side: session-era sessions to sidecars (one per endpoint and caller) and 2026-07-28
stateless requests, both streaming notifications back."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from toolmesh.api.http_wire import Headers, WireClient, WireError, WireResponse
from toolmesh.api.jsonrpc import (
    INTERNAL_ERROR,
    METHOD_NOT_FOUND,
    PROTOCOL_VERSION_KEY,
    UPSTREAM_UNAVAILABLE,
    dumps,
    error_message,
    loads,
)
from toolmesh.api.mcp_http import MAX_EVENT_BYTES, NAME_BEARING_METHODS, encode_header_value, iter_sse

log = logging.getLogger("toolmesh.registry")

PROTOCOL_VERSION = "2025-11-25"
"""The session-era revision of the gateway's sidecar sessions (every upstream the sidecar fronts understands it)."""

Notify = Callable[[Mapping[str, Any]], Awaitable[None]]
Ask = Callable[[Mapping[str, Any]], Awaitable[Mapping[str, Any]]]
"""Puts a server's request (sampling, elicitation, roots) to the caller; returns the caller's result or error."""


async def discard(_: Mapping[str, Any]) -> None:
    """The Notify of a request whose notifications nobody hears (listings, delegated tasks)."""
LISTEN_OPEN_TIMEOUT = 2.0
"""Seconds a call that may be asked waits for its session's GET stream to open before going out anyway."""
CLIENT_CAPABILITIES = {"sampling": {}, "elicitation": {"form": {}, "url": {}}, "roots": {"listChanged": True}}
"""Declared to sidecars so servers may ask; a caller that cannot answer gets its refusal relayed back."""


TRANSPORT_ERRORS = (WireError, asyncio.TimeoutError, OSError)
"""How a sidecar that cannot be reached, or breaks the connection, shows."""
CONNECT_TIMEOUT = 3.0


class _Answer:
    """One HTTP answer from a sidecar: status, headers by any spelling, the body whole or as it arrives."""

    __slots__ = ("status", "headers", "_response")

    def __init__(self, response: WireResponse):
        self.status = response.status
        self.headers = Headers(response.headers)
        self._response = response

    async def read(self) -> bytes:
        return await self._response.read()

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        return self._response.chunks()


class BackendUnavailable(Exception):
    """The sidecar could not be reached or broke the connection: try another instance, try this one last."""


class BackendRefused(Exception):
    """The sidecar answered, with an error and no result: 401/403 from its policy, or an HTTP error it relayed from
    its upstream (a 503). The call failed; the instance stays in service. Relay it to the caller."""

    def __init__(self, status: int, message: Mapping[str, Any] | None, headers: Mapping[str, str]):
        error = (message or {}).get("error") or {}
        super().__init__(f"HTTP {status}: {error.get('message', 'refused')}")
        self.status = status
        self.message = message
        self.headers = {k.lower(): v for k, v in headers.items()}
        """Lowercased names (a challenge is `www-authenticate`)."""


@dataclass(slots=True)
class _Session:
    endpoint: str
    headers: dict[str, str]
    session_id: str | None = None
    ready: asyncio.Lock = field(default_factory=asyncio.Lock)
    asks: list[Ask] = field(default_factory=list)
    """How to put a question to the caller of each call in flight that can be asked, latest last."""
    relay: Notify | None = None
    """Where notifications on the GET stream go (resource updates, list changes): the caller's session."""
    listener: asyncio.Task | None = None
    """Reads the session's GET stream, where servers may send their requests instead of on the call's stream."""

    def request_headers(self) -> dict[str, str]:
        """The headers of a request within the session: the caller's, plus the session id once there is one."""
        if self.session_id:
            return {**self.headers, "Mcp-Session-Id": self.session_id}
        return self.headers


async def sse_data(chunks: AsyncIterator[bytes], max_event_bytes: int = MAX_EVENT_BYTES) -> AsyncIterator[bytes]:
    """The data of each Server-Sent Event a sidecar sends, as it arrives. An event beyond `max_event_bytes` ends
    the stream (the call then fails as one answered without a response) instead of filling the registry's memory."""
    try:
        async for event in iter_sse(chunks, max_event_bytes):
            yield event.data
    except ValueError as exc:
        log.warning("a sidecar's event stream was cut: %s", exc)


class BackendPool:
    """Session-era MCP sessions to sidecars, keyed by endpoint, caller token and budget key.

    The caller's bearer token goes with every request so the sidecar's policy
    judges the caller, never the gateway; keying sessions by token keeps one
    caller's session state (budgets, cached results) apart from another's.
    """

    def __init__(self, *, client_name: str = "toolmesh-gateway") -> None:
        self._http = WireClient(connect_timeout=CONNECT_TIMEOUT)
        self._sessions: dict[tuple[str, str | None, str | None], _Session] = {}
        self._ids = itertools.count(1)
        self._client_name = client_name
        self._session_only: set[str] = set()
        """Endpoints that answered a 2026-07-28 request as a server of the session era only does; asked again
        after they were unreachable (a restarted sidecar may front another server)."""

    async def start(self) -> None:
        """Nothing to open: connections are made on first use and kept alive per endpoint."""

    @contextlib.asynccontextmanager
    async def _exchange(self, method: str, endpoint: str, headers: Mapping[str, str],
                        body: bytes | None = None) -> AsyncIterator[_Answer]:
        """One request to a sidecar; the connection goes back to the pool if the answer was read to its end."""
        response = await self._http.request(method, endpoint, headers, body)
        try:
            yield _Answer(response)
        finally:
            response.release()

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for s in sessions.values():
            if s.listener is not None:
                s.listener.cancel()
            if s.session_id:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1), self._exchange("DELETE", s.endpoint, s.request_headers()):
                        pass
        self._http.close()

    async def end_sessions(self, budget_key: str) -> None:
        """End the sidecar sessions opened for one caller session (it was deleted or went idle)."""
        for key in [k for k in self._sessions if k[2] == budget_key]:
            session = self._sessions.pop(key)
            if session.listener is not None:
                session.listener.cancel()
            if session.session_id:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2), \
                            self._exchange("DELETE", session.endpoint, session.request_headers()) as resp:
                        await resp.read()

    def forget_endpoint(self, endpoint: str) -> None:
        self._session_only.discard(endpoint)
        self._http.forget(endpoint)
        for key in [k for k in self._sessions if k[0] == endpoint]:
            session = self._sessions.pop(key)
            if session.listener is not None:
                session.listener.cancel()

    async def request(self, endpoint: str, method: str, params: Mapping[str, Any] | None, *,
                      authorization: str | None = None, budget_key: str | None = None,
                      notify: Notify | None = None, ask: Ask | None = None,
                      relay: Notify | None = None) -> dict[str, Any]:
        """Send one request through a session and return the JSON-RPC response (result or error).

        Notifications the sidecar streams before the response (progress, log
        messages) go to `notify`; requests it streams (sampling, elicitation,
        roots) go to `ask` and its answer goes back to the sidecar. Cancelling the awaiting task tells the
        sidecar with `notifications/cancelled` and drops the stream.
        """
        key = (endpoint, authorization, budget_key)
        session = self._sessions.get(key)
        if session is None:
            headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
            if authorization:
                headers["Authorization"] = authorization
            if budget_key:
                headers["Mcp-Budget-Key"] = budget_key
            session = self._sessions[key] = _Session(endpoint, headers)
        if relay is not None:
            session.relay = relay
        if ask is not None:
            session.asks.append(ask)
        try:
            return await self._request(session, method, params, notify, ask)
        finally:
            if ask is not None:
                session.asks.remove(ask)

    def speaks_stateless(self, endpoint: str) -> bool:
        """Whether 2026-07-28 requests go to `endpoint` as they are (true until it answered one as session-only)."""
        return endpoint not in self._session_only

    async def request_stateless(self, endpoint: str, method: str, params: Mapping[str, Any], *,
                                authorization: str | None = None, budget_key: str | None = None,
                                headers: Mapping[str, str] | None = None,
                                notify: Notify | None = None) -> dict[str, Any] | None:
        """Send one 2026-07-28 request as it is (its `_meta` envelope carries the caller's era, capabilities and
        client) and return the JSON-RPC response: a result, `input_required` included, or an error.

        None when the sidecar answers as a server of the session era only does
        (HTTP 400 without a response to this request: it never ran it); the
        endpoint is remembered as such, and the caller goes the session way.
        Notifications streamed before the response (progress, log messages) go
        to `notify`. Cancelling the awaiting task closes the response stream,
        which is this era's cancellation.
        """
        request_id = next(self._ids)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        meta = params.get("_meta") or {}
        out = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": str(meta.get(PROTOCOL_VERSION_KEY)), "Mcp-Method": method, **(headers or {})}
        named = params.get(NAME_BEARING_METHODS.get(method, ""))
        if isinstance(named, str):
            out["Mcp-Name"] = encode_header_value(named)
        if authorization:
            out["Authorization"] = authorization
        if budget_key:
            out["Mcp-Budget-Key"] = budget_key
        try:
            async with self._exchange("POST", endpoint, out, dumps(message)) as resp:
                body = await _read_response(resp, request_id, notify)
                if resp.status >= 400 and (body is None or body.get("id") != request_id):
                    if resp.status == 400:
                        log.info("%s does not serve the 2026-07-28 protocol (%s): its stateless callers go through "
                                 "sessions", endpoint, ((body or {}).get("error") or {}).get("message", "HTTP 400"))
                        self._session_only.add(endpoint)
                        return None
                    if body is None:
                        _response(resp, None, request_id)  # raises: what its absence means
                    raise BackendRefused(resp.status, body, resp.headers)
                if resp.status in (401, 403):
                    raise BackendRefused(resp.status, body, resp.headers)
        except TRANSPORT_ERRORS as exc:
            raise BackendUnavailable(str(exc) or type(exc).__name__) from exc
        return _response(resp, body, request_id)

    async def _request(self, session: _Session, method: str, params: Mapping[str, Any] | None,
                       notify: Notify | None, ask: Ask | None) -> dict[str, Any]:
        for attempt in range(2):
            await self._ensure_ready(session)
            if (ask is not None or session.relay is not None) and (session.listener is None
                                                                    or session.listener.done()):
                # Listening before the call goes out: a server's request sent while no GET stream is open is lost.
                opened = asyncio.Event()
                session.listener = asyncio.get_running_loop().create_task(
                    self._listen(session, session.session_id, opened))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(opened.wait(), LISTEN_OPEN_TIMEOUT)
            request_id = next(self._ids)
            message = {"jsonrpc": "2.0", "id": request_id, "method": method}
            if params is not None:
                message["params"] = params
            try:
                return await self._send(session, message, notify, ask)
            except _SessionExpired:
                # The sidecar (or its upstream) restarted and forgot the session: start a new one once.
                session.session_id = None
                if attempt:
                    raise BackendUnavailable("session lost twice") from None
            except asyncio.CancelledError:
                asyncio.get_running_loop().create_task(self._cancel(session, request_id))
                raise
        raise AssertionError("unreachable")

    async def _ensure_ready(self, session: _Session) -> None:
        if session.session_id is not None:
            return
        async with session.ready:
            if session.session_id is not None:
                return
            init = {"jsonrpc": "2.0", "id": next(self._ids), "method": "initialize", "params": {
                "protocolVersion": PROTOCOL_VERSION, "capabilities": CLIENT_CAPABILITIES,
                "clientInfo": {"name": self._client_name, "version": "1"}}}
            try:
                async with self._exchange("POST", session.endpoint, session.headers, dumps(init)) as resp:
                    body = await _read_response(resp, init["id"], None)
                    if resp.status >= 400 or body is None or "error" in body:
                        raise BackendRefused(resp.status, body, resp.headers)
                    session.session_id = resp.headers.get("Mcp-Session-Id", "")
                    version = (body.get("result") or {}).get("protocolVersion", PROTOCOL_VERSION)
                    session.headers["MCP-Protocol-Version"] = version
                note = dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
                async with self._exchange("POST", session.endpoint, session.request_headers(), note) as resp:
                    await resp.read()
            except TRANSPORT_ERRORS as exc:
                session.session_id = None
                raise BackendUnavailable(str(exc) or type(exc).__name__) from exc

    async def _send(self, session: _Session, message: dict[str, Any], notify: Notify | None,
                    ask: Ask | None) -> dict[str, Any]:
        try:
            async with self._exchange("POST", session.endpoint, session.request_headers(),
                                      dumps(message)) as resp:
                if resp.status == 404 and session.session_id:
                    raise _SessionExpired
                body = await _read_response(resp, message["id"], notify,
                                            lambda m: self._answer_server_request(session, m, ask))
                if resp.status == 400 and session.session_id and (body is None or body.get("id") != message["id"]):
                    # Not an answer to this request: the server does not know the session. The spec says 404, but
                    # servers in the field (the reference everything server among them) say 400 "No valid
                    # session ID provided" after a restart: a new session, once, as for 404.
                    raise _SessionExpired
                if resp.status in (401, 403):
                    # The sidecar's policy refused the caller: its status and challenge matter to the caller.
                    raise BackendRefused(resp.status, body, resp.headers)
        except TRANSPORT_ERRORS as exc:
            raise BackendUnavailable(str(exc) or type(exc).__name__) from exc
        return _response(resp, body, message["id"])

    async def _answer_server_request(self, session: _Session, request: Mapping[str, Any], ask: Ask | None) -> None:
        """Sampling, elicitation or roots asked of the caller: relayed when the caller can be asked, otherwise
        refused at once (the tool then fails or falls back) instead of leaving the server waiting."""
        if ask is None:
            answer: Mapping[str, Any] = error_message(
                request.get("id"), METHOD_NOT_FOUND,
                f"{request.get('method')} is not available through the toolmesh gateway to this caller")
        else:
            answer = {"jsonrpc": "2.0", "id": request.get("id"), **await ask(request)}
        await self._post_quietly(session, answer, timeout=5)

    async def _listen(self, session: _Session, session_id: str | None, opened: asyncio.Event) -> None:
        """Answer the requests a server sends on the session's GET stream through the caller of a call in flight.

        Servers (the Python SDK's among them) send a request that no request of
        theirs relates to on this stream; only the gateway session of a call in
        flight can answer it, which is why sidecar sessions are per caller.
        """
        answering: set[asyncio.Task] = set()
        try:
            async with self._exchange("GET", session.endpoint, {**session.request_headers(),
                                                                "Accept": "text/event-stream"}) as resp:
                opened.set()
                if resp.status != 200 or not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                    return
                async for data in sse_data(resp.chunks()):
                    if session.session_id != session_id:
                        return
                    msg = None
                    with contextlib.suppress(orjson.JSONDecodeError):
                        msg = loads(data) if data else None
                    if isinstance(msg, dict) and "method" in msg and "id" not in msg:
                        if session.relay is not None and msg["method"] != "notifications/tools/list_changed":
                            await session.relay(msg)  # the catalogue announces tool changes itself
                    elif isinstance(msg, dict) and "method" in msg and "id" in msg:
                        # Answered aside, so a slow person does not hold up the next request on the stream.
                        task = asyncio.get_running_loop().create_task(
                            self._answer_server_request(session, msg, session.asks[-1] if session.asks else None))
                        answering.add(task)
                        task.add_done_callback(answering.discard)
        except TRANSPORT_ERRORS:
            pass  # opened again by the next call that can ask
        finally:
            opened.set()

    async def _cancel(self, session: _Session, request_id: int) -> None:
        note = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": request_id, "reason": "cancelled by the gateway's caller"}}
        await self._post_quietly(session, note, timeout=2)

    async def _post_quietly(self, session: _Session, message: Mapping[str, Any], *, timeout: float) -> None:
        """Send a message that expects no answer; a sidecar that is away by now changes nothing for the caller."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout), \
                    self._exchange("POST", session.endpoint, session.request_headers(), dumps(message)) as resp:
                await resp.read()


class _SessionExpired(Exception):
    pass


def _response(resp: _Answer, body: dict[str, Any] | None, request_id: Any) -> dict[str, Any]:
    """The JSON-RPC response a sidecar's answer carried, or the failure its absence means."""
    if body is not None:
        return body
    # The sidecar is there and answered, only not with a response: a stream the server closed early, or an HTTP
    # error from the upstream it relayed (503 overloaded, 502...). This call failed; the instance stays in service
    # (the sidecar's retry and circuit breaker deal with a failing upstream, its heartbeat with a dead one).
    if resp.status < 400:
        message = "the server ended the answer without a response"
    else:
        message = f"it answered HTTP {resp.status} without a JSON-RPC response"
        if resp.headers.get("Retry-After"):
            message += f" (Retry-After: {resp.headers['Retry-After'][:32]})"
    code = UPSTREAM_UNAVAILABLE if resp.status >= 500 else INTERNAL_ERROR
    raise BackendRefused(resp.status, error_message(request_id, code, message), resp.headers)


async def _read_response(resp: _Answer, request_id: Any, notify: Notify | None,
                         refuse: Notify | None = None) -> dict[str, Any] | None:
    """The JSON-RPC response to `request_id` from a JSON body or an SSE stream; notifications go to `notify`,
    requests from the server (sampling, elicitation) to `refuse`."""
    ctype = resp.headers.get("Content-Type", "")
    if ctype.startswith("text/event-stream"):
        async for data in sse_data(resp.chunks()):
            if not data:
                continue
            try:
                msg = loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(msg, dict):
                continue
            if "method" in msg and "id" not in msg:
                if notify is not None:
                    await notify(msg)
            elif "method" in msg:
                if refuse is not None:
                    await refuse(msg)
            elif msg.get("id") == request_id and ("result" in msg or "error" in msg):
                return msg
        return None
    raw = await resp.read()
    if not raw:
        return None
    try:
        msg = loads(raw)
    except orjson.JSONDecodeError:
        return None
    return msg if isinstance(msg, dict) else None
