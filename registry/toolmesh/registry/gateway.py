"""The gateway: one MCP Streamable HTTP endpoint composing every healthy server's tools, both protocol eras.

Session era (2025-06-18, 2025-11-25): `initialize` opens a gateway session
(`Mcp-Session-Id`); `notifications/tools/list_changed` goes out on the
session's GET stream. Stateless era (2026-07-28): `server/discover`, then
self-contained POSTs, passed on in that era to sidecars whose servers speak
it; `subscriptions/listen` is the notification stream.
Calls go to a healthy sidecar with the caller's own bearer token, so the
sidecar's policy still decides: the gateway is never a bypass.

A gateway session belongs to the principal that opened it. The gateway does
not verify tokens (its sidecars do), so that principal is the exact
credential presented at `initialize` (`credential_principal`: a digest of the
whole `Authorization` value, or "anonymous"). Every later request naming the
session — calls, cancellations, answers to a server's questions, the GET
stream, DELETE — must present the same credential, or the session is answered
as unknown (404), exactly as one that never existed. A client that refreshes
or changes its token therefore opens a new session (an MCP client does on
404). A server's question to the caller goes out under an unguessable id kept
in the session it was put to, and only that session's principal can answer it.

Sessions are bounded: at most `max_sessions` in all and `max_sessions_per_caller`
per principal. A principal at its cap is refused a new one (HTTP 429, naming
the cap); when the gateway is full, the least recently used session with no
call in flight and no open stream is ended to make room, else the newcomer is
refused (HTTP 503). Anonymous sessions idle sooner (`expire_sessions`).
Session ids never appear in logs: `session_ref()` names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from mcp.shared.inbound import ERROR_CODE_HTTP_STATUS

from toolmesh.api.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    RATE_LIMITED,
    SUBSCRIPTION_ID_KEY,
    UNAUTHORIZED,
    UPSTREAM_UNAVAILABLE,
    dumps,
    error_message,
    has_envelope,
    loads,
    strip_envelope,
)
from toolmesh.api.mcp_http import SESSION_ERA_VERSIONS, STATELESS_ERA_VERSIONS, OriginPolicy, stateless_refusal
from toolmesh.api.sessions import ANONYMOUS, credential_principal, session_ref, unguessable_id
from toolmesh.registry.backend import Ask, BackendPool, BackendRefused, BackendUnavailable, Notify
from toolmesh.registry.catalogue import SEPARATOR, Catalogue, Instance
from toolmesh.registry.metrics import LOCAL_SERVER, UNKNOWN_SERVER, RegistryMetrics
from toolmesh.registry.protected_resource import (
    METADATA_PATH,
    challenge,
    challenge_params,
    metadata_document,
    resource_url,
)

log = logging.getLogger("toolmesh.registry")

SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
LOG_LEVEL_KEY = "io.modelcontextprotocol/logLevel"
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
REMOVED_IN_STATELESS_ERA = frozenset({"initialize", "ping", "logging/setLevel", "resources/subscribe",
                                      "resources/unsubscribe"})
"""Methods a 2026-07-28 server no longer has: over HTTP, unknown methods (404)."""

ASK_TIMEOUT = 600.0
"""Seconds a server's sampling or elicitation request waits for the caller's answer (a person may be typing)."""
LISTED = {"prompts/list": "prompts", "resources/list": "resources", "resources/templates/list": "resourceTemplates"}
"""Listings composed from every healthy server on demand, and the key of their items."""
CACHEABLE = frozenset({"resources/read", "prompts/get"})
"""Results a 2026-07-28 caller may cache, so they carry cache hints."""
CAPABILITIES = {"tools": {"listChanged": True}, "prompts": {"listChanged": True}, "logging": {}, "completions": {},
                "resources": {"subscribe": True, "listChanged": True}}
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OUTBOX_SIZE = 64
"""Server-initiated messages kept for a session's GET stream; beyond, list changes are coalesced and others dropped."""
UNKNOWN_SESSION = "unknown or ended session"
REFUSAL_LOG_EVERY = 60.0
"""Seconds between two log lines about refused sessions (a flood must not flood the log too)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling through the gateway: their credentials travel unchanged to every sidecar."""

    authorization: str | None
    """The caller's `Authorization` header, forwarded as is."""
    budget_key: str | None
    """`Mcp-Budget-Key`, or one derived from the gateway session, so the sidecar keeps one budget per caller session."""
    param_headers: tuple[tuple[str, str], ...] = ()
    """The `Mcp-Param-*` headers of a 2026-07-28 request, passed on with it as that era asks of intermediaries."""


LocalTool = Callable[[Mapping[str, Any], Caller, Notify], Awaitable[dict[str, Any]]]
"""A tool the registry itself serves (e.g. `toolmesh__run_workflow`): (tools/call params, caller, notify) → CallToolResult."""


@dataclass(frozen=True, slots=True)
class MethodCall:
    """One JSON-RPC request to a gateway method, with what dispatch already established about it."""

    request: web.Request
    session: GatewaySession | None
    """The caller's session (session era); None for a 2026-07-28 request, which carries everything itself."""
    request_id: Any
    params: Mapping[str, Any]
    caller: Caller
    method: str

    @property
    def modern(self) -> bool:
        """A stateless-era (2026-07-28) request: no session."""
        return self.session is None


class ToolCallFailed(Exception):
    """A routed call could not be completed; carries the JSON-RPC error for the caller."""

    def __init__(self, code: int, message: str, data: Any = None, *, status: int = 200,
                 challenge: Mapping[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.status = status
        """The HTTP status the caller gets it with: 200 but for a sidecar's 401/403, which keep theirs."""
        self.challenge = dict(challenge or {})
        """What of the sidecar's `WWW-Authenticate` goes into the gateway's own challenge (error, scope)."""

    @property
    def unauthorized(self) -> bool:
        """A sidecar refused the caller's credentials (401) or their scope (403)."""
        return self.status in (401, 403)


@dataclass(slots=True, eq=False)
class GatewaySession:
    """One session-era client of the gateway; what only some sessions need is made on first use (sessions are many)."""

    id: str
    """The `Mcp-Session-Id`: a bearer secret, never logged (see `session_ref`)."""
    protocol_version: str
    principal: str
    """Who opened it (`credential_principal` of its `Authorization`); only they may name it."""
    outbox: asyncio.Queue[bytes] | None = None
    """Server-initiated messages waiting for (or flowing to) the GET stream; made when first needed."""
    list_changed: bool = False
    """A tools list change is to be announced once the outbox exists (no queue is made just for that)."""
    in_flight: dict[Any, asyncio.Task] = field(default_factory=dict)
    """Running requests by the client's JSON-RPC id, so `notifications/cancelled` can stop them."""
    asks: dict[str, asyncio.Future[dict[str, Any]]] | None = None
    """Server requests put to this session's caller, by the unguessable id the gateway gave them."""
    last_used: float = field(default_factory=time.monotonic)
    """When the client last sent anything; idle sessions are ended."""
    streams: int = 0
    """Open GET streams (a client listening is never idle)."""
    called: bool = False
    """It sent something a sidecar saw, so ending it ends sessions with sidecars too."""

    @property
    def budget_key(self) -> str:
        """What sidecars know this session by (`Mcp-Budget-Key` when the caller sets none): never the id itself."""
        return "gateway-session:" + (session_ref(self.id) or "")

    @property
    def busy(self) -> bool:
        """A call in flight or a stream open: never ended for room or idleness."""
        return bool(self.in_flight or self.streams)

    def outbox_queue(self) -> asyncio.Queue[bytes]:
        if self.outbox is None:
            self.outbox = asyncio.Queue(maxsize=OUTBOX_SIZE)
        return self.outbox

    def wake(self) -> None:
        """Wake the GET stream, if one listens, to see that the session is gone."""
        if self.outbox is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self.outbox.put_nowait(b"")


class SessionRefused(Exception):
    """No room for a new gateway session: the caller should retry later, or end sessions it no longer uses."""

    def __init__(self, status: int, message: str, retry_after: int):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class Gateway:
    """Routes MCP requests from agents to the sidecars behind the catalogue."""

    def __init__(self, catalogue: Catalogue, backends: BackendPool, *, page_size: int = 1000,
                 server_name: str = "toolmesh-gateway", version: str = "0",
                 allowed_origins: tuple[str, ...] = (), max_sessions: int = 10_000,
                 max_sessions_per_caller: int = 100, public_url: str | None = None,
                 require_token: bool = False) -> None:
        self.catalogue = catalogue
        self.public_url = public_url
        """The gateway's public MCP URL (`--public-url`): its RFC 9728 `resource`; default: from each request."""
        self.require_token = require_token
        """`--require-token`: while a server behind the gateway authenticates callers, every MCP request without
        a bearer token gets 401 and the challenge (not only the calls such a server refuses)."""
        self.path = "/mcp"
        self.metrics = RegistryMetrics()
        """Calls by server and outcome (and the registry's heartbeat counts): `/metrics`."""
        self._origins = OriginPolicy(allowed_origins)
        self.backends = backends
        self.page_size = page_size
        self.server_info = {"name": server_name, "version": version}
        self.sessions: OrderedDict[str, GatewaySession] = OrderedDict()
        """Session-era sessions by id, least recently used first."""
        self.max_sessions = max_sessions
        """Sessions kept in all; beyond, the least recently used idle one goes, or the newcomer is refused."""
        self.max_sessions_per_caller = max_sessions_per_caller
        """Sessions one principal may hold; beyond, its `initialize` is refused."""
        self._held: Counter[str] = Counter()
        """Principal → sessions it holds."""
        self._refused = 0
        self._refusal_logged = 0.0
        self.listeners: set[asyncio.Queue[bytes]] = set()
        self.local_tools: dict[str, tuple[dict[str, Any], LocalTool]] = {}
        self._visible: dict[tuple[str, str | None, int], tuple[float, frozenset[str]]] = {}
        """(sidecar endpoint, caller's Authorization, catalogue version) → (until, tool names it lists them)."""
        self._prompt_owners: dict[str, str] = {}
        """Bare prompt name → the server that answers to it (highest priority), as last listed."""
        self._resource_owners: dict[str, str] = {}
        """Resource URI (or template) → the server that serves it (highest priority), as last listed."""
        self._list_changed = dumps({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        self._closing: set[asyncio.Task] = set()
        """Sidecar sessions of evicted gateway sessions being closed in the background."""
        self.methods: dict[str, Callable[[MethodCall], Awaitable[web.StreamResponse]]] = {
            "ping": self._m_ping,
            "server/discover": self._m_discover,
            "tools/list": self._m_tools_list,
            "tools/call": self._m_tools_call,
            "subscriptions/listen": self._m_listen,
            "logging/setLevel": self._m_set_level,
            "prompts/get": self._m_prompts_get,
            "completion/complete": self._m_complete,
            **dict.fromkeys(LISTED, self._m_composed_list),
            **dict.fromkeys(("resources/read", "resources/subscribe", "resources/unsubscribe"), self._m_resource),
        }
        """The methods a caller may send once its session (if any) is known: initialize is dispatched before."""
        catalogue.on_change(self._announce_change)

    def close(self) -> None:
        """End every session and listen stream (the registry is stopping)."""
        sessions, listeners = list(self.sessions.values()), list(self.listeners)
        self.sessions.clear()
        self.listeners.clear()
        self._held.clear()
        for task in self._closing:
            task.cancel()
        for session in sessions:
            for task in session.in_flight.values():
                task.cancel()
            session.wake()
        for queue in listeners:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(b"")

    def add_local_tool(self, definition: dict[str, Any], handler: LocalTool) -> None:
        self.local_tools[definition["name"]] = (definition, handler)

    # -- HTTP ----------------------------------------------------------------------

    def routes(self, path: str = "/mcp") -> list[web.RouteDef]:
        self.path = path
        return [web.post(path, self.guarded(self.handle_post)), web.get(path, self.guarded(self.handle_get)),
                web.delete(path, self.guarded(self.handle_delete)),
                web.get(METADATA_PATH, self.handle_metadata), web.get(METADATA_PATH + path, self.handle_metadata)]

    # -- OAuth: the gateway speaks MCP authorization for the servers behind it, and verifies nothing ------------

    def resource(self, request: web.Request) -> str:
        """The gateway's resource identifier as this caller reaches it (see `protected_resource.resource_url`)."""
        return resource_url(self.public_url, request.scheme, request.host, self.path)

    async def handle_metadata(self, request: web.Request) -> web.Response:
        """RFC 9728 metadata naming the authorization servers the servers behind the gateway trust (404: none)."""
        auths = self.catalogue.caller_auths()
        if not auths:
            return web.json_response({"error": "no server behind this gateway authenticates callers"}, status=404)
        return _json(metadata_document(self.resource(request), auths))

    def _challenged(self, request: web.Request, request_id: Any, failed: ToolCallFailed) -> web.Response:
        """A sidecar's 401/403 for this request, with that status and a challenge naming the gateway's metadata."""
        return _json(error_message(request_id, failed.code, failed.message, failed.data), failed.status,
                     headers={"WWW-Authenticate": challenge(self.resource(request), failed.challenge)})

    def _token_demanded(self, request: web.Request) -> web.Response | None:
        """`--require-token`: a 401 with the challenge for a request without a token, while any server behind the
        gateway authenticates callers; None to let it through."""
        if not self.require_token or request.headers.get("Authorization"):
            return None
        if not self.catalogue.caller_auths():
            return None
        return _json(error_message(None, UNAUTHORIZED, "authentication required: send a bearer token"), 401,
                     headers={"WWW-Authenticate": challenge(self.resource(request))})

    def origin_allowed(self, origin: str | None) -> bool:
        """DNS-rebinding protection the transport spec asks for: browsers may call only from allowed origins."""
        return self._origins.allows(origin)

    def guarded(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        async def check_origin(request: web.Request) -> web.StreamResponse:
            if not self.origin_allowed(request.headers.get("Origin")):
                return _json(error_message(None, INVALID_REQUEST, "origin not allowed"), 403)
            return self._token_demanded(request) or await handler(request)

        return check_origin

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        try:
            message = loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return _json(error_message(None, INVALID_REQUEST,
                                       f"request body larger than {request.client_max_size} bytes"), 413)
        except orjson.JSONDecodeError:
            return _json(error_message(None, PARSE_ERROR, "parse error"), 400)
        if not isinstance(message, dict):
            return _json(error_message(None, INVALID_REQUEST, "one JSON-RPC message per POST"), 400)
        method = message.get("method")
        if (not isinstance(method, str) or "id" not in message or request.headers.get("Mcp-Session-Id")
                or not _is_modern(message, request.headers)):
            return await self._dispatch(request, message, method)
        # A 2026-07-28 request: checked before dispatch as an SDK server checks it, and every error answer
        # carries the HTTP status that era gives its code.
        answer = _modern_rejection(message, request.headers)
        if answer is None:
            answer = await self._dispatch(request, message, method)
        body = answer.body if isinstance(answer, web.Response) and answer.status == 200 else None
        if isinstance(body, bytes) and b'"error":{"code":' in body[:256]:
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                code = loads(answer.body)["error"]["code"]
                answer.set_status(ERROR_CODE_HTTP_STATUS.get(code, 200))
        return answer

    async def _dispatch(self, request: web.Request, message: dict[str, Any], method: Any) -> web.StreamResponse:
        if method == "initialize":
            return await self._initialize(request, message)
        session = None
        if "Mcp-Session-Id" in request.headers:
            session = self.session_of(request)
            if session is None:
                request_id = message.get("id") if isinstance(method, str) else None
                return _json(error_message(request_id, INVALID_REQUEST, UNKNOWN_SESSION), 404)
        if not isinstance(method, str):
            # A caller's answer to a server's request we relayed: only the session it was put to can answer it, and
            # only from the principal that opened that session (both checked above). Anything else: nothing to do.
            answer_id = message.get("id")
            waiting = session.asks.get(answer_id) if session is not None and session.asks and \
                isinstance(answer_id, str) else None
            if waiting is not None and not waiting.done():
                waiting.set_result({k: message[k] for k in ("result", "error") if k in message}
                                   or {"error": {"code": INVALID_REQUEST, "message": "empty answer"}})
            return web.Response(status=202)
        if session is not None and method not in ("ping", "notifications/initialized"):
            session.called = True
        if "id" not in message:
            if method == "notifications/cancelled" and session is not None:
                task = session.in_flight.get((message.get("params") or {}).get("requestId"))
                if task is not None:
                    task.cancel()
            return web.Response(status=202)
        request_id = message["id"]
        params = message.get("params") or {}
        if not isinstance(params, dict):
            return _json(error_message(request_id, INVALID_PARAMS, "params must be an object"))
        caller = Caller(request.headers.get("Authorization"),
                        request.headers.get("Mcp-Budget-Key") or (session.budget_key if session else None),
                        () if session else tuple((k, v) for k, v in request.headers.items()
                                                 if k.lower().startswith("mcp-param-")))
        handler = self.methods.get(method)
        if handler is None:
            return _json(error_message(request_id, METHOD_NOT_FOUND, f"method not found: {method}"))
        call = MethodCall(request, session, request_id, params, caller, method)
        try:
            return await handler(call)
        except ToolCallFailed as exc:  # only a sidecar's 401/403 leaves `_routed`
            return self._challenged(request, request_id, exc)

    # -- the methods of the table in __init__ (`self.methods`), each given one MethodCall --
    async def _m_ping(self, call: MethodCall) -> web.StreamResponse:
        return _json({"jsonrpc": "2.0", "id": call.request_id, "result": {}})

    async def _m_discover(self, call: MethodCall) -> web.StreamResponse:
        return _json({"jsonrpc": "2.0", "id": call.request_id, "result": self._discover()})

    async def _m_tools_list(self, call: MethodCall) -> web.StreamResponse:
        return await self._tools_list(call.request_id, call.params, call.caller, modern=call.modern)

    async def _m_tools_call(self, call: MethodCall) -> web.StreamResponse:
        return await self._tools_call(call.request, call.session, call.request_id, call.params, call.caller)

    async def _m_listen(self, call: MethodCall) -> web.StreamResponse:
        return await self._listen(call.request, call.request_id, call.params)

    async def _m_composed_list(self, call: MethodCall) -> web.StreamResponse:
        return _json(await self._composed_list(call.request_id, call.method, call.caller, modern=call.modern))

    async def _m_set_level(self, call: MethodCall) -> web.StreamResponse:
        return _json(await self._set_level(call.request_id, call.params, call.caller))

    async def _m_prompts_get(self, call: MethodCall) -> web.StreamResponse:
        return _json(await self._prompts_get(call.request_id, call.params, call.caller, modern=call.modern))

    async def _m_complete(self, call: MethodCall) -> web.StreamResponse:
        return _json(await self._complete(call.request_id, call.params, call.caller, modern=call.modern))

    async def _m_resource(self, call: MethodCall) -> web.StreamResponse:
        return _json(await self._resource_request(call.request_id, call.method, call.params, call.caller,
                                                  call.session))

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        if "Mcp-Session-Id" not in request.headers:
            return web.Response(status=405)
        session = self.session_of(request)
        if session is None:
            return _json(error_message(None, INVALID_REQUEST, UNKNOWN_SESSION), 404)
        response = web.StreamResponse(headers={**SSE_HEADERS, "Mcp-Session-Id": session.id})
        outbox = session.outbox_queue()
        if session.list_changed:
            session.list_changed = False
            _offer(outbox, self._list_changed)
        session.streams += 1  # busy from before the client sees the stream open
        try:
            await response.prepare(request)
            while True:
                data = await outbox.get()
                if self.sessions.get(session.id) is not session:
                    break
                await response.write(b"event: message\ndata: " + data + b"\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            session.streams -= 1
            self._touch(session)
        return response

    async def handle_delete(self, request: web.Request) -> web.Response:
        session = self.session_of(request)
        if session is None:
            return _json(error_message(None, INVALID_REQUEST, UNKNOWN_SESSION), 404)
        await self.end_session(session)
        return web.Response(status=200)

    def session_of(self, request: web.Request) -> GatewaySession | None:
        """The session a request names, if it comes from the principal that opened it; else None (answer 404).

        Another principal's session and one that never existed look the same,
        so nobody learns whether a session id is live. A use counts as
        activity: the session becomes the most recently used.
        """
        session = self.sessions.get(request.headers.get("Mcp-Session-Id", ""))
        if session is None:
            return None
        principal = credential_principal(request.headers.get("Authorization"))
        if not secrets.compare_digest(session.principal, principal):
            return None
        self._touch(session)
        return session

    def _touch(self, session: GatewaySession) -> None:
        session.last_used = time.monotonic()
        if self.sessions.get(session.id) is session:
            self.sessions.move_to_end(session.id)

    def _forget(self, session: GatewaySession) -> bool:
        """Drop a session from the table, stop its calls and wake its stream; False when it was already gone."""
        if self.sessions.get(session.id) is not session:
            return False
        del self.sessions[session.id]
        left = self._held[session.principal] - 1
        if left > 0:
            self._held[session.principal] = left
        else:
            del self._held[session.principal]
        for task in session.in_flight.values():
            task.cancel()
        session.wake()  # the GET stream sees the session gone
        return True

    async def end_session(self, session: GatewaySession) -> None:
        """Forget a session: stop its calls, close its GET stream, end its sessions with the sidecars."""
        if self._forget(session) and session.called:
            await self.backends.end_sessions(session.budget_key)

    def _evict(self, session: GatewaySession) -> None:
        """End a session to make room, without waiting for its sidecar sessions to close."""
        if self._forget(session) and session.called:
            task = asyncio.get_running_loop().create_task(self.backends.end_sessions(session.budget_key))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def session_count(self, principal: str | None = None) -> int:
        """Sessions open now, in all or held by `principal`."""
        return len(self.sessions) if principal is None else self._held.get(principal, 0)

    async def expire_sessions(self, idle: float, anonymous_idle: float | None = None) -> None:
        """End sessions nobody used for `idle` seconds (`anonymous_idle` for anonymous ones): clients that vanished
        without DELETE. A session with a call in flight or an open stream is never idle."""
        anonymous_idle = idle if anonymous_idle is None else anonymous_idle
        now = time.monotonic()
        newest = now - min(idle, anonymous_idle)
        stale = []
        for session in self.sessions.values():  # least recently used first: stop at the first too recent
            if session.last_used >= newest:
                break
            limit = anonymous_idle if session.principal == ANONYMOUS else idle
            if session.last_used < now - limit and not session.busy:
                stale.append(session)
        for session in stale:
            await self.end_session(session)

    def _make_room(self, principal: str) -> None:
        """Room for one more session of `principal`, or SessionRefused (see the module docstring)."""
        if self._held.get(principal, 0) >= self.max_sessions_per_caller:
            raise SessionRefused(429, f"too many sessions for this caller (at most {self.max_sessions_per_caller} "
                                      "per credential); end sessions you no longer use (DELETE)", 60)
        if len(self.sessions) < self.max_sessions:
            return
        idle = next((s for s in self.sessions.values() if not s.busy), None)
        if idle is None:
            raise SessionRefused(503, f"the gateway holds its maximum of {self.max_sessions} sessions, all busy", 5)
        log.info("gateway session %s ended to make room (at most %d sessions)", session_ref(idle.id),
                 self.max_sessions)
        self._evict(idle)

    def _log_refusal(self, exc: SessionRefused) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_EVERY:
            self._refusal_logged = now
            log.warning("gateway refused %d new session(s) in the last %gs: %s", self._refused, REFUSAL_LOG_EVERY,
                        exc.message)
            self._refused = 0

    # -- methods -------------------------------------------------------------------

    async def _initialize(self, request: web.Request, message: Mapping[str, Any]) -> web.Response:
        params = message.get("params")
        asked = params.get("protocolVersion") if isinstance(params, Mapping) else None
        version = asked if asked in SESSION_ERA_VERSIONS else SESSION_ERA_VERSIONS[0]
        principal = credential_principal(request.headers.get("Authorization"))
        try:
            self._make_room(principal)
        except SessionRefused as exc:
            self._log_refusal(exc)
            return _json(error_message(message.get("id"), RATE_LIMITED, exc.message), exc.status,
                         headers={"Retry-After": str(exc.retry_after)})
        session = GatewaySession(id=unguessable_id(), protocol_version=version, principal=principal)
        self.sessions[session.id] = session
        self._held[principal] += 1
        result = {"protocolVersion": version, "capabilities": CAPABILITIES,
                  "serverInfo": self.server_info,
                  "instructions": "Tools of every healthy server behind toolmesh, named server__tool."}
        return _json({"jsonrpc": "2.0", "id": message.get("id"), "result": result},
                     headers={"Mcp-Session-Id": session.id})

    def _discover(self) -> dict[str, Any]:
        return {"supportedVersions": [*STATELESS_ERA_VERSIONS, *SESSION_ERA_VERSIONS],
                "capabilities": CAPABILITIES,
                "serverInfo": self.server_info,
                "resultType": "complete", "ttlMs": 0, "cacheScope": "public",
                "_meta": {SERVER_INFO_KEY: self.server_info}}

    async def _tools_list(self, request_id: Any, params: Mapping[str, Any], caller: Caller, *,
                          modern: bool) -> web.Response:
        view = self.catalogue.view()
        filtered = {s: i for s in self.catalogue.servers() if (i := self.catalogue.caller_filtered(s)) is not None}
        try:
            if filtered:
                page, cursor = await self._callers_page(view, filtered, caller, params.get("cursor"))
            else:
                page, cursor = view.page_json(params.get("cursor"), self.page_size)
        except ValueError as exc:
            return _json(error_message(request_id, INVALID_PARAMS, str(exc)))
        # Assembled from pre-serialised pages: 2,000 tools are not re-encoded on every listing.
        parts = [dumps(d) for d, _ in self.local_tools.values()] if not params.get("cursor") else []
        if page:
            parts.append(page)
        extra: dict[str, Any] = {}
        if cursor:
            extra["nextCursor"] = cursor
        if modern:
            # Stateless-era clients cache by these hints; the catalogue changes at any heartbeat.
            extra.update(resultType="complete", ttlMs=0, cacheScope="private",
                         _meta={SERVER_INFO_KEY: self.server_info})
        tail = dumps(extra)[1:-1]
        body = b"".join([b'{"jsonrpc":"2.0","id":', dumps(request_id), b',"result":{"tools":[',
                         b",".join(parts), b"]", b"," + tail if tail else b"", b"}}"])
        return web.Response(body=body, content_type="application/json")

    async def _callers_page(self, view: Any, filtered: Mapping[str, Instance], caller: Caller,
                            cursor: str | None) -> tuple[bytes, str | None]:
        """A page of the tools this caller may call: sidecars that authenticate are asked with the caller's token."""
        servers = sorted(filtered)
        visible = await asyncio.gather(*(self._visible_tools(filtered[s], caller) for s in servers))
        allowed = {s: names for s, names in zip(servers, visible)}
        tools = [t for t in view.tools
                 if (route := view.routes[t["name"]]).server not in allowed or route.tool in allowed[route.server]]
        start = view.offset(cursor)
        end = start + self.page_size
        return dumps(tools[start:end])[1:-1], (f"{view.version}:{end}" if end < len(tools) else None)

    async def _visible_tools(self, inst: Instance, caller: Caller) -> frozenset[str]:
        """The tool names `inst`'s sidecar lists for this caller, cached briefly; nothing when it refuses them."""
        key = (inst.endpoint, caller.authorization, self.catalogue.version)
        cached = self._visible.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        names: set[str] = set()
        try:
            cursor = None
            for _ in range(50):
                answer = await self.backends.request(inst.endpoint, "tools/list", {"cursor": cursor} if cursor else {},
                                                     authorization=caller.authorization)
                result = answer.get("result") or {}
                names.update(t.get("name") for t in result.get("tools") or [] if isinstance(t, dict))
                cursor = result.get("nextCursor")
                if "error" in answer or not cursor:
                    break
        except (BackendUnavailable, BackendRefused):
            names = set()
        visible = frozenset(names)
        if len(self._visible) > 10_000:
            self._visible.clear()
        self._visible[key] = (time.monotonic() + max(1.0, self.catalogue.interval), visible)
        return visible

    async def _tools_call(self, request: web.Request, session: GatewaySession | None, request_id: Any,
                          params: Mapping[str, Any], caller: Caller) -> web.StreamResponse:
        name = params.get("name")
        if not isinstance(name, str):
            return _json(error_message(request_id, INVALID_PARAMS, "tools/call needs a tool name"))
        stream: web.StreamResponse | None = None

        log_levels = _log_levels(params) if session is None else None

        async def notify(note: Mapping[str, Any]) -> None:
            # The first notification commits the answer to an SSE stream; a quick result stays plain JSON.
            nonlocal stream
            if log_levels is not None and note.get("method") == "notifications/message" \
                    and (note.get("params") or {}).get("level") not in log_levels:
                return  # a 2026-07-28 caller gets only the log levels its request asked for
            if stream is None:
                stream = web.StreamResponse(headers=SSE_HEADERS)
                await stream.prepare(request)
            await stream.write(b"event: message\ndata: " + dumps(note) + b"\n\n")

        async def ask(server_request: Mapping[str, Any]) -> dict[str, Any]:
            # The server's request goes to the caller on this call's stream under an unguessable id of ours, kept in
            # the caller's session; the answer arrives as a POST in that session from its principal (see _dispatch)
            # and goes back to the server under the server's id.
            assert session is not None
            ask_id = unguessable_id("toolmesh-")
            asks = session.asks if session.asks is not None else {}
            session.asks = asks
            waiting = asks[ask_id] = asyncio.get_running_loop().create_future()
            try:
                await notify({**server_request, "id": ask_id})
                return await asyncio.wait_for(waiting, ASK_TIMEOUT)
            except asyncio.TimeoutError:
                return {"error": {"code": INTERNAL_ERROR, "message": "the caller did not answer in time"}}
            finally:
                asks.pop(ask_id, None)
                if not asks and session.asks is asks:
                    session.asks = None

        task = asyncio.current_task()
        if session is not None and task is not None:
            session.in_flight[request_id] = task
        try:
            result = await self.call_tool(name, params, caller, notify, ask if session is not None else None,
                                          self._relay_to(session) if session is not None else None)
            if session is None:
                result = _stamped(result, self.server_info)
            answer = {"jsonrpc": "2.0", "id": request_id, "result": result}
        except ToolCallFailed as exc:
            if exc.unauthorized and stream is None:
                return self._challenged(request, request_id, exc)
            answer = error_message(request_id, exc.code, exc.message, exc.data)
        except asyncio.CancelledError:
            if session is not None and self.sessions.get(session.id) is session and request_id in session.in_flight:
                # Cancelled by notifications/cancelled: the spec says send nothing back.
                session.in_flight.pop(request_id, None)
                if stream is not None:
                    return stream
                return web.Response(status=202)
            raise
        finally:
            if session is not None:
                session.in_flight.pop(request_id, None)
                self._touch(session)
        if stream is None:
            return _json(answer)
        await stream.write(b"event: message\ndata: " + dumps(answer) + b"\n\n")
        await stream.write_eof()
        return stream

    async def call_tool(self, name: str, params: Mapping[str, Any], caller: Caller, notify: Notify,
                        ask: Ask | None = None, relay: Notify | None = None) -> dict[str, Any]:
        """Route one `tools/call` by gateway name; returns the CallToolResult or raises ToolCallFailed."""
        server = UNKNOWN_SERVER
        try:
            local = self.local_tools.get(name)
            if local is not None:
                server = LOCAL_SERVER
                result = await local[1](params, caller, notify)
            else:
                view = self.catalogue.view()
                route = view.routes.get(name)
                if route is None:
                    raise ToolCallFailed(INVALID_PARAMS, f"unknown tool: {name}")
                server = route.server
                if route.tool == name and name in view.claimants and name != f"{server}{SEPARATOR}{route.tool}":
                    server = await self._bare_owner(view.claimants[name], name, caller)
                result = await self.call_server(server, {**params, "name": route.tool}, caller, notify, ask=ask,
                                                relay=relay)
        except ToolCallFailed as exc:
            self.metrics.call(server, "refused" if exc.unauthorized else
                              "unavailable" if exc.code == UPSTREAM_UNAVAILABLE else "error")
            raise
        except asyncio.CancelledError:
            self.metrics.call(server, "cancelled")
            raise
        self.metrics.call(server, "tool_error" if result.get("isError") else "ok")
        return result

    async def _bare_owner(self, claimants: tuple[str, ...], tool: str, caller: Caller) -> str:
        """The server a bare tool name leads to for this caller: the highest-priority one that lists it to them.

        A server whose sidecar does not filter by caller lists it to everyone; one that does is asked (with the
        caller's token, cached per catalogue version, as `tools/list` asks). When none lists it to this caller,
        the winner by priority answers, and its sidecar says why not.
        """
        for server in claimants:
            inst = self.catalogue.caller_filtered(server)
            if inst is None or tool in await self._visible_tools(inst, caller):
                return server
        return claimants[0]

    async def call_server(self, server: str, params: Mapping[str, Any], caller: Caller, notify: Notify,
                          instance: Instance | None = None, *, ask: Ask | None = None,
                          method: str = "tools/call", relay: Notify | None = None) -> dict[str, Any]:
        """Send `method` (`tools/call` unless said) to a healthy instance of `server` (a given one, or the least
        busy), failing over once.

        A request in the 2026-07-28 envelope goes to the sidecar as it is, so
        the server sees the caller's capabilities and may answer
        `input_required`; to a sidecar whose server speaks only the session
        era it goes, without the envelope, through a session as every other
        request does.
        """
        stateless = has_envelope(params)
        tried: list[str] = []
        unreachable: BackendUnavailable | None = None
        while True:
            inst = instance if not tried else None
            if instance is None and len(tried) < 2:  # fail over once
                inst = self.catalogue.pick(server, exclude=tried)
            if inst is None:
                if unreachable is not None:
                    raise ToolCallFailed(UPSTREAM_UNAVAILABLE, f"server {server} is unavailable: {unreachable}")
                raise ToolCallFailed(UPSTREAM_UNAVAILABLE, f"server {server} is unavailable: no live instance "
                                                           "(none within its heartbeat deadline)")
            tried.append(inst.instance)
            inst.in_flight += 1
            try:
                response = None
                if stateless and self.backends.speaks_stateless(inst.endpoint):
                    response = await self.backends.request_stateless(
                        inst.endpoint, method, params, authorization=caller.authorization,
                        budget_key=caller.budget_key, headers=dict(caller.param_headers), notify=notify)
                if response is None:
                    response = await self.backends.request(inst.endpoint, method,
                                                           strip_envelope(params) if stateless else params,
                                                           authorization=caller.authorization,
                                                           budget_key=caller.budget_key, notify=notify, ask=ask,
                                                           relay=relay)
            except BackendUnavailable as exc:
                # The sidecar itself cannot be reached: the only failure that is the instance's, not the call's.
                # Another instance gets the call; this one is tried last until it beats again, and its tools stay
                # listed until its heartbeat deadline says otherwise.
                log.warning("instance %s of %s unreachable: %s", inst.instance, server, exc)
                self.catalogue.mark_unreachable(inst, str(exc))
                self.backends.forget_endpoint(inst.endpoint)
                unreachable = exc
                continue
            except BackendRefused as exc:
                raise _refusal(server, exc) from exc
            finally:
                inst.in_flight -= 1
            if inst.unreachable is not None:
                self.catalogue.mark_unreachable(inst, None)
            if "error" in response:
                error = response["error"]
                raise ToolCallFailed(error.get("code", INTERNAL_ERROR), error.get("message", ""), error.get("data"))
            return response.get("result") or {}

    def _relay_to(self, session: GatewaySession) -> Notify:
        """Notifications a server sends outside any call (resource updates, list changes) → the session's GET stream."""
        async def relay(note: Mapping[str, Any]) -> None:
            if self.sessions.get(session.id) is session:
                with contextlib.suppress(asyncio.QueueFull):
                    session.outbox_queue().put_nowait(dumps(note))

        return relay

    # -- prompts and resources: composed from every healthy server on demand -------------

    def _by_priority(self) -> list[str]:
        """Servers that can answer now, the one that wins a clash of names or URIs first."""
        servers = [s for s in self.catalogue.servers() if self.catalogue.healthy_instances(s)]
        return sorted(servers, key=lambda s: (-self.catalogue.traits(s).priority, s))

    async def _server_list(self, server: str, method: str, caller: Caller) -> list[dict[str, Any]]:
        """Every item `server` lists for this caller (all pages); nothing when it has none or refuses."""
        items: list[dict[str, Any]] = []
        cursor = None
        try:
            for _ in range(20):
                result = await self.call_server(server, {"cursor": cursor} if cursor else {}, caller, _ignore,
                                                method=method)
                items.extend(i for i in result.get(LISTED[method]) or () if isinstance(i, dict))
                cursor = result.get("nextCursor")
                if not cursor:
                    break
        except ToolCallFailed:
            pass
        return items

    async def _composed_list(self, request_id: Any, method: str, caller: Caller, *, modern: bool) -> dict[str, Any]:
        key = LISTED[method]
        servers = self._by_priority()
        listings = await asyncio.gather(*(self._server_list(s, method, caller) for s in servers))
        composed: list[dict[str, Any]] = []
        owners: dict[str, str] = {}
        for server, items in zip(servers, listings):
            for item in items:
                if key == "prompts":
                    # Named like tools; the bare name answers too, for the server that wins it.
                    owners.setdefault(str(item.get("name")), server)
                    description = item.get("description") or ""
                    item = {**item, "name": f"{server}{SEPARATOR}{item.get('name')}",
                            "description": f"[{server}] {description}".rstrip()}
                else:
                    # URIs are the resource's identity and stay as they are; on a clash, priority decides.
                    address = str(item.get("uri") or item.get("uriTemplate"))
                    if owners.setdefault(address, server) != server:
                        continue
                composed.append(item)
        (self._prompt_owners if key == "prompts" else self._resource_owners).update(owners)
        result: dict[str, Any] = {key: composed}
        if modern:
            result.update(resultType="complete", ttlMs=0, cacheScope="private", _meta={SERVER_INFO_KEY: self.server_info})
        return {"jsonrpc": "2.0", "id": request_id, "result": result}

    async def _prompts_get(self, request_id: Any, params: Mapping[str, Any], caller: Caller, *,
                           modern: bool) -> dict[str, Any]:
        name = params.get("name")
        if not isinstance(name, str):
            return error_message(request_id, INVALID_PARAMS, "prompts/get needs a prompt name")
        server, _, bare = name.partition(SEPARATOR)
        if not bare or server not in self.catalogue.servers():
            bare = name
            if name not in self._prompt_owners:
                await self._composed_list(None, "prompts/list", caller, modern=False)
            server = self._prompt_owners.get(name, "")
        if not server:
            return error_message(request_id, INVALID_PARAMS, f"unknown prompt: {name}")
        return await self._routed(request_id, server, "prompts/get", {**params, "name": bare}, caller, modern)

    async def _resource_request(self, request_id: Any, method: str, params: Mapping[str, Any], caller: Caller,
                                session: GatewaySession | None) -> dict[str, Any]:
        modern = session is None
        relay = self._relay_to(session) if session is not None and method == "resources/subscribe" else None
        uri = params.get("uri")
        if not isinstance(uri, str):
            return error_message(request_id, INVALID_PARAMS, f"{method} needs a uri")
        forwarded = dict(params)
        if uri not in self._resource_owners:
            await self._composed_list(None, "resources/list", caller, modern=False)
        owner = self._resource_owners.get(uri)
        if owner is not None:
            return await self._routed(request_id, owner, method, forwarded, caller, modern, relay)
        # Not a listed resource: perhaps one of a template's; the first server (by priority) that knows it answers.
        answer = error_message(request_id, INVALID_PARAMS, f"unknown resource: {uri}")
        for server in self._by_priority():
            routed = await self._routed(request_id, server, method, forwarded, caller, modern, relay)
            if "result" in routed:
                self._resource_owners[uri] = server
                return routed
            answer = routed
        return answer

    async def _set_level(self, request_id: Any, params: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        """Every server logs to this caller at the level asked (each keeps the level per sidecar session)."""
        forwarded = strip_envelope(params)
        await asyncio.gather(*(self._routed(None, s, "logging/setLevel", forwarded, caller, False)
                               for s in self._by_priority()), return_exceptions=True)
        return {"jsonrpc": "2.0", "id": request_id, "result": {}}

    async def _complete(self, request_id: Any, params: Mapping[str, Any], caller: Caller, *,
                        modern: bool) -> dict[str, Any]:
        """Completion of a prompt's or a resource template's argument, asked of the server that offers it."""
        ref = params.get("ref") if isinstance(params.get("ref"), Mapping) else {}
        forwarded = dict(params)
        server = None
        if ref.get("type") == "ref/prompt" and isinstance(ref.get("name"), str):
            prefix, _, bare = ref["name"].partition(SEPARATOR)
            if bare and prefix in self.catalogue.servers():
                server, forwarded["ref"] = prefix, {**ref, "name": bare}
            else:
                if ref["name"] not in self._prompt_owners:
                    await self._composed_list(None, "prompts/list", caller, modern=False)
                server = self._prompt_owners.get(ref["name"])
        elif isinstance(ref.get("uri"), str):
            if ref["uri"] not in self._resource_owners:
                await self._composed_list(None, "resources/templates/list", caller, modern=False)
            server = self._resource_owners.get(ref["uri"])
        if server is None:
            return error_message(request_id, INVALID_PARAMS, "unknown prompt or resource template in ref")
        return await self._routed(request_id, server, "completion/complete", forwarded, caller, modern)

    async def _routed(self, request_id: Any, server: str, method: str, params: Mapping[str, Any], caller: Caller,
                      modern: bool, relay: Notify | None = None) -> dict[str, Any]:
        try:
            result = await self.call_server(server, params, caller, _ignore, method=method, relay=relay)
        except ToolCallFailed as exc:
            if exc.unauthorized:
                raise  # answered with the sidecar's status and the gateway's challenge
            return error_message(request_id, exc.code, exc.message, exc.data)
        if modern and result.get("resultType", "complete") == "complete":
            result = _stamped(result, self.server_info)
            if method in CACHEABLE:
                # Routed per caller to servers that may change at any heartbeat: unless the server itself gave hints
                # (a stateless answer), never shared, not kept.
                result = {"ttlMs": 0, "cacheScope": "private", **result}
        return {"jsonrpc": "2.0", "id": request_id, "result": result}

    async def _listen(self, request: web.Request, request_id: Any, params: Mapping[str, Any]) -> web.StreamResponse:
        wanted = (params.get("notifications") or {})
        honoured = {"toolsListChanged": True} if wanted.get("toolsListChanged") else {}
        meta = {SUBSCRIPTION_ID_KEY: request_id}
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        stream = web.StreamResponse(headers=SSE_HEADERS)
        await stream.prepare(request)
        ack = {"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
               "params": {"notifications": honoured, "_meta": meta}}
        await stream.write(b"event: message\ndata: " + dumps(ack) + b"\n\n")
        if not honoured:
            return stream
        changed = dumps({"jsonrpc": "2.0", "method": "notifications/tools/list_changed",
                                "params": {"_meta": meta}})
        self.listeners.add(queue)
        try:
            while True:
                await queue.get()
                if queue not in self.listeners:
                    break
                await stream.write(b"event: message\ndata: " + changed + b"\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.listeners.discard(queue)
        return stream

    def _announce_change(self) -> None:
        for session in self.sessions.values():
            if session.outbox is None:
                session.list_changed = True
            else:
                _offer(session.outbox, self._list_changed)
        for queue in self.listeners:
            _offer(queue, b"")


async def _ignore(_: Mapping[str, Any]) -> None:
    return None


def _refusal(server: str, exc: BackendRefused) -> ToolCallFailed:
    """What the caller is told when a sidecar answered a call with an error and no result."""
    error = (exc.message or {}).get("error") or {}
    code = error.get("code", UPSTREAM_UNAVAILABLE if exc.status >= 500 else INTERNAL_ERROR)
    message = str(error.get("message") or exc)
    if exc.status >= 500:
        # No JSON-RPC answer, an HTTP error relayed from the upstream (503 overloaded...): this call's failure.
        message = f"server {server} is unavailable: {message}"
    if exc.status in (401, 403):
        return ToolCallFailed(code, message, error.get("data"), status=exc.status,
                              challenge=challenge_params(exc.headers.get("www-authenticate")))
    return ToolCallFailed(code, message, error.get("data"))


def _log_levels(params: Mapping[str, Any]) -> frozenset[str]:
    """The log levels a 2026-07-28 request asked for (`logLevel` in its `_meta`): that one and above, else none."""
    meta = params.get("_meta")
    requested = meta.get(LOG_LEVEL_KEY) if isinstance(meta, Mapping) else None
    return frozenset(LOG_LEVELS[LOG_LEVELS.index(requested):]) if requested in LOG_LEVELS else frozenset()


def _stamped(result: dict[str, Any], server_info: Mapping[str, Any]) -> dict[str, Any]:
    """A complete 2026-07-28 result naming the gateway in `_meta`, as that era's servers name themselves.

    The caller speaks to the gateway, so the gateway names itself in place of
    the server behind it. An `input_required` result is the server's own
    question and its state, and goes back untouched.
    """
    if result.get("resultType", "complete") != "complete":
        return result
    meta = result.get("_meta")
    return {**result, "resultType": "complete",
            "_meta": {**(meta if isinstance(meta, Mapping) else {}), SERVER_INFO_KEY: server_info}}


def _is_modern(message: Mapping[str, Any], headers: Mapping[str, str]) -> bool:
    """A 2026-07-28 request: the MCP-Protocol-Version header names that era, or the body carries its envelope."""
    if headers.get("MCP-Protocol-Version") in STATELESS_ERA_VERSIONS:
        return True
    return has_envelope(message.get("params"))


def _modern_rejection(message: Mapping[str, Any], headers: Mapping[str, str]) -> web.Response | None:
    """What the gateway answers a stateless-era request before dispatch: every method that era removed is refused,
    as are bad routing headers and envelopes (api.mcp_http.stateless_refusal)."""
    refused = stateless_refusal(message, headers, removed=REMOVED_IN_STATELESS_ERA)
    return None if refused is None else _json(refused.error(message.get("id")), refused.status)


def _offer(queue: asyncio.Queue[bytes], item: bytes) -> None:
    # list_changed is a level trigger: one pending copy is as good as many.
    if queue.empty():
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(item)


def _json(message: Mapping[str, Any], status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(message), status=status, content_type="application/json",
                        headers=headers)
