"""Routes JSON-RPC between many client sessions and one upstream message channel, rewriting ids so they never collide.

The stdio bridge (one child shared by every session) and the legacy HTTP+SSE
adapter (one upstream connection per session) both move whole JSON-RPC
messages over a single ordered channel. A `Multiplexer` sits on that channel:

- every client request gets a fresh upstream id (and, when it asked for
  progress, a fresh `progressToken`); the answer goes back with the client's
  own id and token, so two sessions both sending id 1 never meet;
- what the upstream sends while a request is in flight (progress, server
  requests such as sampling or elicitation, logging) goes out on that
  request's own response stream; `post()` answers with plain JSON when the
  final response is the first thing to arrive and with SSE events otherwise;
- notifications not tied to a request go to every session's GET stream;
- a client's `notifications/cancelled` names its own id and is rewritten; a
  client that goes away before anything was streamed cancels upstream too;
- a session's SSE streams are resumable (`resumable.py`): a priming event
  first, an id on every event, and a client that lost a POST's stream
  reconnects with GET + Last-Event-ID to get what it missed and the rest of
  the call; a call whose client does not come back within `resume_grace`
  seconds is cancelled upstream;
- `fail_all` ends every in-flight request with one typed error, never a hang.

A stdio channel carries no link between a server request and the client
request it serves, so the bridge routes sampling/elicitation/roots requests to
the session of the most recently started in-flight call (tools/call,
prompts/get, resources/read preferred) whose client declared the capability.
With one call in flight this is exact; with several sessions calling at once
it is the best available guess. Whichever session it goes to, it goes under an
id the bridge mints (`unguessable_id`), and only that session's answer to that
id reaches the upstream, under the server's own id: a server's small integer
ids would otherwise let any caller answer another's sampling request.

Everything a client names is looked up in its own session: a cancellation's
`requestId` among that session's requests, a `Last-Event-ID` in that session's
event log. Session ids are unguessable; logs name sessions by `session_ref()`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson

from toolmesh.api.jsonrpc import INVALID_REQUEST, METHOD_NOT_FOUND, SUBSCRIPTION_ID_KEY, dumps, error_message, loads
from toolmesh.api.mcp_http import SseEvent
from toolmesh.api.sessions import session_ref, unguessable_id
from toolmesh.sidecar.errors import ProxyError, UpstreamTimeout
from toolmesh.sidecar.transports.base import (
    ACCEPTED,
    JSON_HEADERS,
    SSE_HEADERS,
    UpstreamResponse,
    invalid_request,
    json_response,
)
from toolmesh.sidecar.transports.resumable import GET_STREAM, MAX_BYTES, MAX_EVENTS, EventLog, ResumeRefused
from toolmesh.sidecar.transports.sessions import ClientSession

log = logging.getLogger("toolmesh.sidecar.multiplex")

# Requests during which a server is likely to ask its client something.
_SERVING_METHODS = frozenset({"tools/call", "prompts/get", "resources/read", "completion/complete"})
# The client capability a server request needs; sessions without it never receive one.
_CAPABILITY_OF = {"sampling/createMessage": "sampling", "elicitation/create": "elicitation", "roots/list": "roots"}

# What a pending request's queue carries.
_EVENT, _FINAL, _FAILED, _ENDED, _SILENT = range(5)


class Pending:
    """A client request forwarded upstream and not yet answered."""

    __slots__ = ("upstream_id", "client_id", "session", "method", "token", "queue", "started", "batch", "stream",
                 "grace", "answer")

    def __init__(self, upstream_id: int, client_id: Any, session: ClientSession | None, method: str, batch: bool):
        self.upstream_id = upstream_id
        self.client_id = client_id
        self.session = session
        self.method = method
        self.token: Any = None
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.started = time.monotonic()
        self.batch = batch
        self.stream: int | None = None
        """The session stream number once the answer is SSE (its events are then logged for resumption)."""
        self.grace: asyncio.TimerHandle | None = None
        """The timer cancelling the request upstream when its client left and has not resumed yet."""
        self.answer: dict[str, Any] | None = None
        """The final answer, parsed, when it came first (as plain JSON)."""

    def deliver(self, data: bytes) -> None:
        """An event for this request's client: on its response stream, or its session's stream for batches."""
        if self.batch:
            if self.session is not None:
                self.session.push(data)
        elif self.stream is None:
            self.queue.put_nowait((_EVENT, data))
        else:
            self.queue.put_nowait((_EVENT, self.session.events.record(self.stream, data)))

    def settle(self, kind: int, payload: Any = None) -> None:
        """The request is over: its answer (_FINAL), its failure (_FAILED) or no answer at all (_ENDED)."""
        stream = self.stream
        if stream is not None:
            self.stop_streaming()
            if kind == _FAILED:
                kind, payload = _FINAL, dumps(error_message(self.client_id, payload.code, payload.message,
                                                            payload.data))
            if kind == _FINAL:
                payload = self.session.events.record(stream, payload)
        self.queue.put_nowait((kind, payload))

    def stop_streaming(self) -> None:
        """Nothing more will come on this request's stream: a resume gets what was logged, and no grace timer runs."""
        self.session.live.pop(self.stream, None)
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None


class Multiplexer:
    """JSON-RPC routing between client sessions and one upstream channel; `send` writes one message upstream."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]], *, timeout: float | None = None,
                 resume_grace: float = 30.0, resume_events: int = MAX_EVENTS, resume_bytes: int = MAX_BYTES):
        self._send = send
        self.timeout = timeout
        """Longest silence (seconds) allowed on a request before it fails with UpstreamTimeout; progress resets it."""
        self.resume_grace = resume_grace
        """Seconds a request whose client lost its SSE stream keeps running for a resume; then it is cancelled."""
        self.resumable = True
        """False while the policy in force authenticates callers, filters what they see or budgets results: the
        log holds answers as the server sent them, before the policy chain, so replaying one could hand a caller
        what the chain would not (an untruncated result, another caller's answer). Streams then end with their
        client, as they do without a session."""
        self.resume_events = resume_events
        """Events each session keeps for resumption."""
        self.resume_bytes = resume_bytes
        """Bytes of events each session keeps for resumption."""
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._tokens: dict[int, Pending] = {}
        self._server_requests: dict[str, tuple[ClientSession, Any]] = {}
        """Server requests sent to a client, by the id the bridge gave them: (the session, the server's own id)."""
        self._server_ids: dict[Any, str] = {}
        """The server's id of each server request in flight -> the bridge's id (for the server's cancellations)."""
        self._own: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._answers: set[asyncio.Task[None]] = set()
        self.sessions: dict[str, ClientSession] = {}
        """Open sessions, least recently used first (`touch` moves a session last)."""

    # -- sessions ---------------------------------------------------------------------------------------------

    def new_session(self, params: Mapping[str, Any] | None, session_id: str | None = None) -> ClientSession:
        """Open a session for a client whose `initialize` carried `params`."""
        params = params if isinstance(params, Mapping) else {}
        capabilities = params.get("capabilities")
        version = params.get("protocolVersion")
        session = ClientSession(
            session_id or unguessable_id(),
            capabilities if isinstance(capabilities, Mapping) else {},
            version if isinstance(version, str) else None,
            EventLog(self.resume_events, self.resume_bytes),
        )
        self.sessions[session.id] = session
        return session

    def open_stream(self, session: ClientSession, replay: list[SseEvent] | None = None) -> UpstreamResponse:
        """The session's server-initiated SSE stream (the client's GET); a newer GET supersedes an older one.

        `replay` (a resume): the events after the client's Last-Event-ID come first instead of a priming event.
        """
        if session.stream is not None:
            session.stream.put_nowait(None)
        queue: asyncio.Queue[SseEvent | None] = asyncio.Queue()
        if replay is None:
            opening = [session.events.priming(GET_STREAM)]
            opening.extend(session.backlog)
        else:
            opening = replay
        session.backlog.clear()  # logged too: a replay holds those after the client's last event
        session.stream = queue

        async def events() -> AsyncIterator[SseEvent]:
            for event in opening:
                yield event
            while (event := await queue.get()) is not None:
                yield event

        async def release() -> None:
            if session.stream is queue:
                session.stream = None
                self.touch(session)

        return UpstreamResponse(status=200, headers=SSE_HEADERS, events=events(), release=release)

    async def end_session(self, session: ClientSession) -> None:
        """Forget the session: cancel its in-flight requests upstream and end its stream."""
        self.sessions.pop(session.id, None)
        for pending in list(session.pending.values()):
            await self._abandon(pending, "session ended")
            pending.settle(_ENDED)
        for uri in session.subscriptions:
            if not self._subscribers(uri):
                # The last subscriber left: the upstream may stop watching.
                self._answer_upstream({"jsonrpc": "2.0", "id": next(self._ids), "method": "resources/unsubscribe",
                                       "params": {"uri": uri}})
        session.subscriptions.clear()
        for bridge_id in [bid for bid, (owner, _) in self._server_requests.items() if owner is session]:
            self._server_ids.pop(self._server_requests.pop(bridge_id)[1], None)
        if session.stream is not None:
            session.stream.put_nowait(None)
            session.stream = None

    def touch(self, session: ClientSession) -> None:
        """The session was just used: it becomes the most recently used (sweeps and eviction read from the other end)."""
        session.last_active = time.monotonic()
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            self.sessions[session.id] = session

    @staticmethod
    def is_idle(session: ClientSession) -> bool:
        """Nothing in flight and no stream open: the session may be ended for room, or when it was left."""
        return not session.pending and session.stream is None

    def end_streams(self) -> None:
        """End every GET stream (the upstream is going away for good)."""
        for session in self.sessions.values():
            if session.stream is not None:
                session.stream.put_nowait(None)
                session.stream = None

    # -- client → upstream ------------------------------------------------------------------------------------

    async def post(self, message: Any, session: ClientSession | None, raw: bytes | None = None) -> UpstreamResponse:
        """Forward one client POST (a parsed message or batch; `raw` is its bytes when unchanged)."""
        if isinstance(message, list):
            return await self._batch(message, session)
        if not isinstance(message, dict):
            return invalid_request()
        if "method" in message:
            if "id" in message:
                return await self.call(message, session)
            await self.notify(message, session, raw)
            return ACCEPTED
        if "id" in message and ("result" in message or "error" in message):
            await self.respond(message, session)
            return ACCEPTED
        return invalid_request(message.get("id"))

    def _register(self, message: Mapping[str, Any], session: ClientSession | None,
                  batch: bool = False) -> tuple[Pending, bytes]:
        """Route a client request: a fresh upstream id (and progress token). The request as the upstream gets it
        comes back with its route; the client's message is left as it was."""
        upstream_id = next(self._ids)
        pending = Pending(upstream_id, message.get("id"), session, str(message.get("method")), batch)
        upstream_message = {**message, "id": upstream_id}
        params = message.get("params")
        if isinstance(params, dict):
            meta = params.get("_meta")
            if isinstance(meta, dict) and "progressToken" in meta:
                # Tokens are the client's choice and collide across sessions just like ids do.
                pending.token = meta["progressToken"]
                upstream_message["params"] = {**params, "_meta": {**meta, "progressToken": upstream_id}}
                self._tokens[upstream_id] = pending
        self._pending[upstream_id] = pending
        if session is not None:
            session.pending[pending.client_id] = pending
        return pending, dumps(upstream_message)

    def _forget(self, pending: Pending) -> bool:
        """Drop the request's routes; False when it was already answered or forgotten."""
        if self._pending.pop(pending.upstream_id, None) is None:
            return False
        if pending.token is not None:
            self._tokens.pop(pending.upstream_id, None)
        if pending.stream is not None:
            pending.stop_streaming()
        if pending.session is not None:
            pending.session.pending.pop(pending.client_id, None)
        return True

    async def _abandon(self, pending: Pending, reason: str) -> None:
        """The client no longer wants the answer: tell the upstream to stop working on it."""
        if not self._forget(pending):
            return
        note = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": pending.upstream_id, "reason": reason}}
        try:
            await self._send(dumps(note))
        except ProxyError:
            pass

    def _subscribers(self, uri: str) -> list[ClientSession]:
        return [s for s in self.sessions.values() if uri in s.subscriptions]

    def subscribed_uris(self) -> set[str]:
        """Every resource some session subscribed to (to subscribe a restarted upstream again)."""
        return {uri for session in self.sessions.values() for uri in session.subscriptions}

    async def call(self, message: dict[str, Any], session: ClientSession | None) -> UpstreamResponse:
        """Forward one client request; JSON when the answer comes first, SSE when anything precedes it."""
        method = message.get("method")
        if session is not None and method in ("resources/subscribe", "resources/unsubscribe"):
            params = message.get("params")
            uri = params.get("uri") if isinstance(params, dict) else None
            if isinstance(uri, str):
                if method == "resources/subscribe":
                    session.subscriptions.add(uri)
                else:
                    session.subscriptions.discard(uri)
                    if self._subscribers(uri):
                        # Another session still watches it: the shared upstream must keep its subscription.
                        return json_response(200, {"jsonrpc": "2.0", "id": message.get("id"), "result": {}})
        pending, sent = self._register(message, session)
        try:
            await self._send(sent)
        except BaseException:
            self._forget(pending)
            raise
        try:
            kind, payload = await self._next(pending)
        except asyncio.CancelledError:
            await asyncio.shield(self._abandon(pending, "client disconnected"))
            raise
        if kind == _FINAL:
            return UpstreamResponse(status=200, headers=JSON_HEADERS, body=payload, message=pending.answer)
        if kind == _FAILED:
            raise payload
        if kind == _ENDED:
            return ACCEPTED
        if session is None or not self.resumable:
            # No session, no GET to resume with (or resuming is off): a client leaving ends the call.
            return UpstreamResponse(status=200, headers=SSE_HEADERS, events=self._events(pending, payload),
                                    release=lambda: self._abandon(pending, "client disconnected"))
        return self._stream(pending, session, payload)

    def _stream(self, pending: Pending, session: ClientSession, first: bytes) -> UpstreamResponse:
        """Answer with a resumable SSE stream: a priming event, then every event with an id, logged for replay."""
        stream, priming = session.events.open_stream()
        queue = pending.queue
        early: list[tuple[int, Any]] = []
        while not queue.empty():
            early.append(queue.get_nowait())
        pending.stream = stream
        if self._pending.get(pending.upstream_id) is pending:
            session.live[stream] = pending
        opening = [priming, session.events.record(stream, first)]
        for kind, payload in early:
            # What arrived with the first event goes through the log too, in order.
            if kind == _EVENT:
                pending.deliver(payload)
            elif kind != _SILENT:
                pending.settle(kind, payload)
        return UpstreamResponse(status=200, headers=SSE_HEADERS, events=self._stream_events(pending, queue, opening),
                                release=lambda: self._detach(pending, queue))

    def resume(self, session: ClientSession, last_event_id: str) -> UpstreamResponse:
        """A GET with Last-Event-ID: the stream's events after it, then (while its call runs) the rest as it comes."""
        if not self.resumable:
            return json_response(400, error_message(None, INVALID_REQUEST, "Bad Request: streams are not resumable "
                                                    "while the policy authenticates callers or budgets results"))
        try:
            stream, missed = session.events.after(last_event_id)
        except ResumeRefused as exc:
            return json_response(400, error_message(None, INVALID_REQUEST, f"Bad Request: {exc}"))
        if stream == GET_STREAM:
            return self.open_stream(session, replay=missed)
        pending = session.live.get(stream)
        if pending is None:
            # The call is over (its answer, if any, is among the missed events).
            return UpstreamResponse(status=200, headers=SSE_HEADERS, events=_replay(missed))
        if pending.grace is not None:
            pending.grace.cancel()
            pending.grace = None
        # The resumed stream takes the call over; whoever still reads the old one is told it ended.
        old, queue = pending.queue, asyncio.Queue()
        pending.queue = queue
        old.put_nowait((_ENDED, None))
        return UpstreamResponse(status=200, headers=SSE_HEADERS, events=self._stream_events(pending, queue, missed),
                                release=lambda: self._detach(pending, queue))

    async def _detach(self, pending: Pending, queue: asyncio.Queue[tuple[int, Any]]) -> None:
        """A POST stream's client is gone: the call runs on `resume_grace` seconds for a resume, then is cancelled."""
        if pending.queue is not queue or self._pending.get(pending.upstream_id) is not pending:
            return  # a resume took it over, or it was answered
        if self.resume_grace <= 0:
            await self._abandon(pending, "client disconnected")
            return
        pending.grace = asyncio.get_running_loop().call_later(self.resume_grace, self._give_up, pending, queue)

    def _give_up(self, pending: Pending, queue: asyncio.Queue[tuple[int, Any]]) -> None:
        pending.grace = None
        if pending.queue is queue:
            task = asyncio.get_running_loop().create_task(self._abandon(pending, "client did not resume its stream"))
            self._answers.add(task)
            task.add_done_callback(self._answers.discard)

    async def _stream_events(self, pending: Pending, queue: asyncio.Queue[tuple[int, Any]],
                             first: list[SseEvent]) -> AsyncIterator[SseEvent]:
        for event in first:
            yield event
        while True:
            kind, payload = await self._next(pending, queue)
            if kind == _EVENT:
                yield payload
            elif kind == _FINAL:
                yield payload
                return
            elif kind == _FAILED:
                pending.settle(_FAILED, payload)  # logged, and next out of the queue
            else:
                return

    async def _next(self, pending: Pending, queue: asyncio.Queue[tuple[int, Any]] | None = None) -> tuple[int, Any]:
        """The request's next message; a silence longer than the timeout gives up on it (and cancels it upstream)."""
        if queue is None:
            queue = pending.queue
        while True:
            if not queue.empty() or self.timeout is None or pending.method == "subscriptions/listen":
                # (a listen stream is a standing subscription: it may rightly stay silent for hours)
                item = await queue.get()
            else:
                # A timer that queues a marker costs less per call than wait_for's extra task.
                mark = object()
                timer = asyncio.get_running_loop().call_later(self.timeout, queue.put_nowait, (_SILENT, mark))
                try:
                    item = await queue.get()
                finally:
                    timer.cancel()
                if item[1] is mark:
                    await self._abandon(pending, "timed out")
                    return _FAILED, UpstreamTimeout(f"upstream sent nothing for {self.timeout:g}s")
            if item[0] != _SILENT:
                return item  # (a marker from a timer that fired just after an answer is stale: skip it)

    async def _events(self, pending: Pending, first: bytes) -> AsyncIterator[SseEvent]:
        yield SseEvent(data=first)
        while True:
            kind, payload = await self._next(pending)
            if kind == _EVENT:
                yield SseEvent(data=payload)
            elif kind == _FINAL:
                yield SseEvent(data=payload)
                return
            elif kind == _FAILED:
                yield SseEvent(data=dumps(error_message(pending.client_id, payload.code, payload.message, payload.data)))
                return
            else:
                return

    async def notify(self, message: dict[str, Any], session: ClientSession | None, raw: bytes | None = None) -> None:
        """Forward a client notification; a cancellation is re-addressed to the upstream id."""
        if message.get("method") == "notifications/cancelled":
            params = message.get("params")
            request_id = params.get("requestId") if isinstance(params, dict) else None
            # Looked up among this session's own requests only: another session's request is never named here.
            pending = session.pending.get(request_id) if session is not None and _is_key(request_id) else None
            if pending is None or not self._forget(pending):
                return  # nothing of this client's is in flight under that id
            params["requestId"] = pending.upstream_id
            await self._send(dumps(message))
            pending.settle(_ENDED)
            return
        await self._send(raw if raw is not None else dumps(message))

    async def respond(self, message: dict[str, Any], session: ClientSession | None) -> None:
        """Forward a client's answer to a server request, under the server's id, if that request went to `session`.

        An answer from any other session, or to an id the bridge never issued, is dropped: it is no answer.
        """
        bridge_id = message.get("id")
        sent = self._server_requests.get(bridge_id) if isinstance(bridge_id, str) else None
        if sent is None or session is None or sent[0] is not session:
            log.debug("dropped an answer from session %s: no server request awaits it there",
                      session_ref(session.id) if session is not None else None)
            return
        del self._server_requests[bridge_id]
        self._server_ids.pop(sent[1], None)
        message["id"] = sent[1]
        await self._send(dumps(message))

    async def _batch(self, messages: list[Any], session: ClientSession | None) -> UpstreamResponse:
        pendings: list[Pending] = []
        answers: list[Any] = []
        for message in messages:
            if not isinstance(message, dict):
                answers.append(error_message(None, INVALID_REQUEST, "Invalid Request"))
            elif "method" in message and "id" in message:
                pending, sent = self._register(message, session, batch=True)
                try:
                    await self._send(sent)
                except ProxyError as exc:
                    self._forget(pending)
                    answers.append(error_message(pending.client_id, exc.code, exc.message, exc.data))
                    continue
                pendings.append(pending)
            elif "method" in message:
                await self.notify(message, session)
            else:
                await self.respond(message, session)
        try:
            for pending in pendings:
                kind, payload = await self._next(pending)
                if kind == _FINAL:
                    answers.append(pending.answer if pending.answer is not None else loads(payload))
                elif kind == _FAILED:
                    answers.append(error_message(pending.client_id, payload.code, payload.message, payload.data))
        except asyncio.CancelledError:
            for pending in pendings:
                await asyncio.shield(self._abandon(pending, "client disconnected"))
            raise
        return json_response(200, answers) if answers else ACCEPTED

    async def call_own(self, method: str, params: Mapping[str, Any] | None, timeout: float) -> dict[str, Any]:
        """A request of the proxy's own (initialize, ping); the upstream's response message, or a typed error."""
        upstream_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._own[upstream_id] = future
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": upstream_id, "method": method}
        if params is not None:
            message["params"] = params
        try:
            await self._send(dumps(message))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise UpstreamTimeout(f"upstream did not answer {method} within {timeout:g}s") from None
        finally:
            self._own.pop(upstream_id, None)

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send a message of the proxy's own (e.g. notifications/initialized)."""
        await self._send(dumps(message))

    # -- upstream → clients -----------------------------------------------------------------------------------

    def receive(self, raw: bytes) -> None:
        """Route one message (or batch) from the upstream; garbage is logged and skipped."""
        try:
            message = loads(raw)
        except orjson.JSONDecodeError:
            log.warning("skipped upstream output that is not JSON-RPC: %r", raw[:200])
            return
        if isinstance(message, list):
            for item in message:
                self._route(item, None)
        else:
            self._route(message, raw)

    def _route(self, message: Any, raw: bytes | None) -> None:
        if not isinstance(message, dict):
            log.warning("skipped upstream output that is not a JSON-RPC message: %r", (raw or b"")[:200])
            return
        method = message.get("method")
        if method is None:
            self._on_response(message)
        elif "id" in message:
            self._on_server_request(message)
        elif method == "notifications/progress":
            self._on_progress(message)
        else:
            self._on_notification(method, message, raw or dumps(message))

    def _on_response(self, message: dict[str, Any]) -> None:
        upstream_id = message.get("id")
        pending = self._pending.get(upstream_id) if isinstance(upstream_id, int) else None
        if pending is None:
            future = self._own.get(upstream_id) if isinstance(upstream_id, int) else None
            if future is not None and not future.done():
                future.set_result(message)
            else:
                log.debug("dropped an upstream response to %r: nobody waits for it", upstream_id)
            return
        self._forget(pending)
        message["id"] = pending.client_id
        if pending.stream is None:
            pending.answer = message  # parsed once, here: the chain reads this, not the bytes again
            pending.queue.put_nowait((_FINAL, dumps(message)))
        else:
            pending.settle(_FINAL, dumps(message))

    def _on_progress(self, message: dict[str, Any]) -> None:
        params = message.get("params")
        token = params.get("progressToken") if isinstance(params, dict) else None
        pending = self._tokens.get(token) if isinstance(token, int) else None
        if pending is None:
            log.debug("dropped progress for token %r: no request in flight holds it", token)
            return
        params["progressToken"] = pending.token
        pending.deliver(dumps(message))

    def _on_notification(self, method: str, message: dict[str, Any], raw: bytes) -> None:
        if method == "notifications/cancelled":
            # The upstream withdrawing one of its own requests to a client.
            params = message.get("params")
            request_id = params.get("requestId") if isinstance(params, dict) else None
            bridge_id = self._server_ids.pop(request_id, None) if _is_key(request_id) else None
            if bridge_id is not None:
                session = self._server_requests.pop(bridge_id)[0]
                params["requestId"] = bridge_id
                self._to_session(session, dumps(message))
            return
        meta = message.get("params", {}).get("_meta") if isinstance(message.get("params"), dict) else None
        if isinstance(meta, dict) and SUBSCRIPTION_ID_KEY in meta:
            # A frame of a subscriptions/listen stream: it belongs on that request's response stream.
            listener = self._pending.get(meta[SUBSCRIPTION_ID_KEY]) if isinstance(meta[SUBSCRIPTION_ID_KEY], int) \
                else None
            if listener is not None:
                meta[SUBSCRIPTION_ID_KEY] = listener.client_id
                listener.deliver(dumps(message))
            return
        if method == "notifications/resources/updated":
            params = message.get("params")
            uri = params.get("uri") if isinstance(params, dict) else None
            subscribers = self._subscribers(uri) if isinstance(uri, str) else []
            if subscribers:
                for session in subscribers:
                    session.push(raw)
                return
        if method == "notifications/message" and len(self._pending) == 1:
            # Logging while exactly one request runs belongs to that request.
            next(iter(self._pending.values())).deliver(raw)
            return
        for session in self.sessions.values():
            session.push(raw)

    def _to_session(self, session: ClientSession, data: bytes) -> None:
        serving = [p for p in session.pending.values() if not p.batch]
        if serving:
            max(serving, key=lambda p: p.started).deliver(data)
        else:
            session.push(data)

    def _on_server_request(self, message: dict[str, Any]) -> None:
        method = message["method"]
        server_id = message["id"]
        if method == "ping":
            self._answer_upstream({"jsonrpc": "2.0", "id": server_id, "result": {}})
            return
        if not _is_key(server_id):
            log.warning("dropped a server request whose id is neither a string nor a number: %r", server_id)
            return
        capability = _CAPABILITY_OF.get(method)
        pending = self._pick_pending(capability)
        session = pending.session if pending is not None else self._pick_session(capability)
        if session is None:
            what = f"the {capability} capability" if capability else f"{method}"
            self._answer_upstream(error_message(server_id, METHOD_NOT_FOUND, f"no connected client supports {what}"))
            return
        # The client sees an id of the bridge's: the server's small integers are easy to guess from another session.
        bridge_id = unguessable_id("srv-")
        self._server_requests[bridge_id] = (session, server_id)
        self._server_ids[server_id] = bridge_id
        message["id"] = bridge_id
        if pending is not None:
            pending.deliver(dumps(message))
        else:
            session.push(dumps(message))

    def _pick_pending(self, capability: str | None) -> Pending | None:
        best: Pending | None = None
        best_rank: tuple[bool, float] = (False, 0.0)
        for pending in self._pending.values():
            session = pending.session
            if session is None or (capability is not None and capability not in session.capabilities):
                continue
            rank = (pending.method in _SERVING_METHODS, pending.started)
            if best is None or rank > best_rank:
                best, best_rank = pending, rank
        return best

    def _pick_session(self, capability: str | None) -> ClientSession | None:
        candidates = [s for s in self.sessions.values() if capability is None or capability in s.capabilities]
        if not candidates:
            return None
        return max(candidates, key=lambda s: (s.stream is not None, s.last_active))

    def _answer_upstream(self, message: Mapping[str, Any]) -> None:
        # Routing is synchronous; the answer is written from a task held here so it is not collected mid-flight.
        task = asyncio.get_running_loop().create_task(self._send_quietly(dumps(message)))
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _send_quietly(self, data: bytes) -> None:
        try:
            await self._send(data)
        except ProxyError as exc:
            log.debug("could not answer the upstream: %s", exc.message)

    # -- failure ----------------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Client requests awaiting their answer."""
        return len(self._pending)

    def fail_all(self, error: ProxyError) -> None:
        """End every in-flight request (the client's and the proxy's own) with `error`."""
        pendings = list(self._pending.values())
        self._pending.clear()
        self._tokens.clear()
        self._server_requests.clear()
        self._server_ids.clear()
        for pending in pendings:
            if pending.session is not None:
                pending.session.pending.pop(pending.client_id, None)
            pending.settle(_FAILED, error)
        own = list(self._own.values())
        self._own.clear()
        for future in own:
            if not future.done():
                future.set_exception(error)


def _is_key(value: Any) -> bool:
    """Whether a JSON-RPC id can key a route (a string or a number; not a list or object a broken peer sent)."""
    return isinstance(value, (str, int, float))


async def _replay(events: list[SseEvent]) -> AsyncIterator[SseEvent]:
    for event in events:
        yield event
