"""What every family of gateway methods shares: who calls, one method call and the table it is dispatched by, how a
routed call fails, and the shapes of the answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from toolmesh.api.jsonrpc import dumps
from toolmesh.api.mcp_http import SseEvent, encode_sse
from toolmesh.registry.backend import Notify
from toolmesh.registry.gateway.sessions import GatewaySession

SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
    def stateless_era(self) -> bool:
        """A stateless-era (2026-07-28) request: no session."""
        return self.session is None


Method = Callable[[MethodCall], Awaitable[web.StreamResponse]]
"""A gateway method: one MethodCall in, the HTTP answer out."""


class MethodTable:
    """JSON-RPC method name → the method that answers it. Each family of methods registers its own, each name once;
    `initialize` is not here (it is answered before a session exists)."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def register(self, method: Method, *names: str) -> None:
        for name in names:
            if name in self._methods:
                raise ValueError(f"gateway method {name} registered twice")
            self._methods[name] = method

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)


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


def json_response(message: Mapping[str, Any], status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON answer; integers beyond 64 bits stay exact (`api.jsonrpc.dumps`)."""
    return web.Response(body=dumps(message), status=status, content_type="application/json", headers=headers)


def sse_message(data: bytes) -> bytes:
    """One JSON-RPC message as an SSE `message` event."""
    return encode_sse(SseEvent(data, event="message"))


def stamped(result: dict[str, Any], server_info: Mapping[str, Any]) -> dict[str, Any]:
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


def private_listing(server_info: Mapping[str, Any]) -> dict[str, Any]:
    """What a 2026-07-28 listing composed by the gateway carries: complete, for this caller only, not to be kept
    (stateless-era clients cache by these hints, and what is behind the gateway changes at any heartbeat)."""
    return {"resultType": "complete", "ttlMs": 0, "cacheScope": "private", "_meta": {SERVER_INFO_KEY: server_info}}
