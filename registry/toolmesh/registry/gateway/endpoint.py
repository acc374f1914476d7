"""The gateway's MCP endpoint: Streamable HTTP POST/GET/DELETE at `/mcp` in both protocol eras, sessions, the checks
made before dispatch, and the method table every family of methods registers into."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from toolmesh.api.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    RATE_LIMITED,
    UNAUTHORIZED,
    error_message,
    loads,
)
from toolmesh.api.mcp_http import (
    ERROR_CODE_HTTP_STATUS,
    SESSION_ERA_VERSIONS,
    STATELESS_ERA_VERSIONS,
    OriginPolicy,
    is_stateless_era,
    load_stateless_rules,
    stateless_refusal,
)
from toolmesh.api.sessions import credential_principal
from toolmesh.registry.backend import BackendPool
from toolmesh.registry.catalogue import Catalogue
from toolmesh.registry.gateway.calls import (
    SERVER_INFO_KEY,
    Caller,
    MethodCall,
    MethodTable,
    ToolCallFailed,
    json_response,
)
from toolmesh.registry.gateway.composed import Composed
from toolmesh.registry.gateway.relay import take_answer
from toolmesh.registry.gateway.routing import Sidecars
from toolmesh.registry.gateway.sessions import SessionRefused, Sessions
from toolmesh.registry.gateway.subscriptions import Subscriptions
from toolmesh.registry.gateway.tools import Tools
from toolmesh.registry.metrics import RegistryMetrics
from toolmesh.registry.protected_resource import METADATA_PATH, challenge, metadata_document, resource_url

REMOVED_IN_STATELESS_ERA = frozenset({"initialize", "ping", "logging/setLevel", "resources/subscribe",
                                      "resources/unsubscribe"})
"""Methods a 2026-07-28 server no longer has: over HTTP, unknown methods (404)."""
CAPABILITIES = {"tools": {"listChanged": True}, "prompts": {"listChanged": True}, "logging": {}, "completions": {},
                "resources": {"subscribe": True, "listChanged": True}}
UNKNOWN_SESSION = "unknown or ended session"


class Gateway:
    """Routes MCP requests from agents to the sidecars behind the catalogue.

    The families of methods — `tools` (tools/list, tools/call), `composed`
    (prompts, resources, completion, logging), `subscriptions` (resource
    subscriptions, list changes, the session GET stream) — each register
    theirs into `methods`; this class answers HTTP, keeps sessions and
    dispatches. `sidecars` asks the servers behind the catalogue.
    """

    def __init__(self, catalogue: Catalogue, backends: BackendPool, *, page_size: int = 1000,
                 server_name: str = "toolmesh-gateway", version: str = "0",
                 allowed_origins: tuple[str, ...] = (), max_sessions: int = 10_000,
                 max_sessions_per_caller: int = 100, public_url: str | None = None,
                 require_token: bool = False) -> None:
        self.catalogue = catalogue
        self.backends = backends
        self.public_url = public_url
        """The gateway's public MCP URL (`--public-url`): its RFC 9728 `resource`; default: from each request."""
        self.require_token = require_token
        """`--require-token`: while a server behind the gateway authenticates callers, every MCP request without
        a bearer token gets 401 and the challenge (not only the calls such a server refuses)."""
        self.path = "/mcp"
        self.metrics = RegistryMetrics()
        """Calls by server and outcome (and the registry's heartbeat counts): `/metrics`."""
        self._origins = OriginPolicy(allowed_origins)
        self.server_info = {"name": server_name, "version": version}
        self.sessions = Sessions(backends, max_sessions=max_sessions, max_sessions_per_caller=max_sessions_per_caller)
        self.sidecars = Sidecars(catalogue, backends, self.server_info)
        self.tools = Tools(catalogue, self.sidecars, self.sessions, self.metrics, server_info=self.server_info,
                           page_size=page_size)
        self.composed = Composed(catalogue, self.sidecars, server_info=self.server_info)
        self.subscriptions = Subscriptions(catalogue, self.sessions, self.composed)
        self.methods = MethodTable()
        """The methods a caller may send once its session (if any) is known: initialize is dispatched before."""
        for family in (self, self.tools, self.composed, self.subscriptions):
            family.register(self.methods)

    def register(self, methods: MethodTable) -> None:
        methods.register(self.ping, "ping")
        methods.register(self.discover, "server/discover")

    def close(self) -> None:
        """End every session and listen stream (the registry is stopping)."""
        self.sessions.close()
        self.subscriptions.close()

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
        return json_response(metadata_document(self.resource(request), auths))

    def _challenged(self, request: web.Request, request_id: Any, failed: ToolCallFailed) -> web.Response:
        """A sidecar's 401/403 for this request, with that status and a challenge naming the gateway's metadata."""
        return json_response(error_message(request_id, failed.code, failed.message, failed.data), failed.status,
                             headers={"WWW-Authenticate": challenge(self.resource(request), failed.challenge)})

    def _token_demanded(self, request: web.Request) -> web.Response | None:
        """`--require-token`: a 401 with the challenge for a request without a token, while any server behind the
        gateway authenticates callers; None to let it through."""
        if not self.require_token or request.headers.get("Authorization"):
            return None
        if not self.catalogue.caller_auths():
            return None
        return json_response(error_message(None, UNAUTHORIZED, "authentication required: send a bearer token"), 401,
                             headers={"WWW-Authenticate": challenge(self.resource(request))})

    def origin_allowed(self, origin: str | None) -> bool:
        """DNS-rebinding protection the transport spec asks for: browsers may call only from allowed origins."""
        return self._origins.allows(origin)

    def guarded(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        async def check_origin(request: web.Request) -> web.StreamResponse:
            if not self.origin_allowed(request.headers.get("Origin")):
                return json_response(error_message(None, INVALID_REQUEST, "origin not allowed"), 403)
            return self._token_demanded(request) or await handler(request)

        return check_origin

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        try:
            message = loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return json_response(error_message(None, INVALID_REQUEST,
                                               f"request body larger than {request.client_max_size} bytes"), 413)
        except orjson.JSONDecodeError:
            return json_response(error_message(None, PARSE_ERROR, "parse error"), 400)
        if not isinstance(message, dict):
            return json_response(error_message(None, INVALID_REQUEST, "one JSON-RPC message per POST"), 400)
        method = message.get("method")
        if (not isinstance(method, str) or "id" not in message or request.headers.get("Mcp-Session-Id")
                or not is_stateless_era(message, request.headers)):
            return await self._dispatch(request, message, method)
        # A 2026-07-28 request: checked before dispatch as an SDK server checks it, and every error answer
        # carries the HTTP status that era gives its code.
        await load_stateless_rules()
        answer = _stateless_rejection(message, request.headers)
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
            session = self.sessions.named_by(request)
            if session is None:
                request_id = message.get("id") if isinstance(method, str) else None
                return json_response(error_message(request_id, INVALID_REQUEST, UNKNOWN_SESSION), 404)
        if not isinstance(method, str):
            # A caller's answer to a server's request we relayed: only the session it was put to can answer it, and
            # only from the principal that opened that session (both checked above). Anything else: nothing to do.
            take_answer(session, message)
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
            return json_response(error_message(request_id, INVALID_PARAMS, "params must be an object"))
        caller = Caller(request.headers.get("Authorization"),
                        request.headers.get("Mcp-Budget-Key") or (session.budget_key if session else None),
                        () if session else tuple((k, v) for k, v in request.headers.items()
                                                 if k.lower().startswith("mcp-param-")))
        handler = self.methods.get(method)
        if handler is None:
            return json_response(error_message(request_id, METHOD_NOT_FOUND, f"method not found: {method}"))
        call = MethodCall(request, session, request_id, params, caller, method)
        try:
            return await handler(call)
        except ToolCallFailed as exc:  # only a sidecar's 401/403 leaves a method
            return self._challenged(request, request_id, exc)

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        if "Mcp-Session-Id" not in request.headers:
            return web.Response(status=405)
        session = self.sessions.named_by(request)
        if session is None:
            return json_response(error_message(None, INVALID_REQUEST, UNKNOWN_SESSION), 404)
        return await self.subscriptions.session_stream(request, session)

    async def handle_delete(self, request: web.Request) -> web.Response:
        session = self.sessions.named_by(request)
        if session is None:
            return json_response(error_message(None, INVALID_REQUEST, UNKNOWN_SESSION), 404)
        await self.sessions.end(session)
        return web.Response(status=200)

    # -- the lifecycle: initialize (before dispatch), ping and server/discover (in the table) --------------------

    async def _initialize(self, request: web.Request, message: Mapping[str, Any]) -> web.Response:
        params = message.get("params")
        asked = params.get("protocolVersion") if isinstance(params, Mapping) else None
        version = asked if asked in SESSION_ERA_VERSIONS else SESSION_ERA_VERSIONS[0]
        try:
            session = self.sessions.open(credential_principal(request.headers.get("Authorization")), version)
        except SessionRefused as exc:
            return json_response(error_message(message.get("id"), RATE_LIMITED, exc.message), exc.status,
                                 headers={"Retry-After": str(exc.retry_after)})
        result = {"protocolVersion": version, "capabilities": CAPABILITIES,
                  "serverInfo": self.server_info,
                  "instructions": "Tools of every healthy server behind toolmesh, named server__tool."}
        return json_response({"jsonrpc": "2.0", "id": message.get("id"), "result": result},
                             headers={"Mcp-Session-Id": session.id})

    async def ping(self, call: MethodCall) -> web.StreamResponse:
        return json_response({"jsonrpc": "2.0", "id": call.request_id, "result": {}})

    async def discover(self, call: MethodCall) -> web.StreamResponse:
        result = {"supportedVersions": [*STATELESS_ERA_VERSIONS, *SESSION_ERA_VERSIONS],
                  "capabilities": CAPABILITIES,
                  "serverInfo": self.server_info,
                  "resultType": "complete", "ttlMs": 0, "cacheScope": "public",
                  "_meta": {SERVER_INFO_KEY: self.server_info}}
        return json_response({"jsonrpc": "2.0", "id": call.request_id, "result": result})


def _stateless_rejection(message: Mapping[str, Any], headers: Mapping[str, str]) -> web.Response | None:
    """What the gateway answers a stateless-era request before dispatch: every method that era removed is refused,
    as are bad routing headers and envelopes (api.mcp_http.stateless_refusal)."""
    refused = stateless_refusal(message, headers, removed=REMOVED_IN_STATELESS_ERA)
    return None if refused is None else json_response(refused.error(message.get("id")), refused.status)
