"""A bridge serving stateless-era requests (2026-07-28) as a Streamable HTTP server of that era would.

A message-channel upstream (a stdio child, a legacy SSE connection) serves one
protocol era per channel. A bridge settles a channel in the stateless era with
its own `server/discover` (`discover_params`, `serves_stateless_era`) and
answers that era's requests on it with the checks an HTTP server applies
before dispatch (`stateless_rejection`, `Mcp-Param-*` against the tool's
schema) and the HTTP statuses that era gives error codes. A server that has no
stateless era gets such requests without the era's envelope, and its answers
are reshaped for that era (`in_stateless_shape`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from mcp.shared.inbound import ERROR_CODE_HTTP_STATUS, validate_mcp_param_headers

from toolmesh.api.jsonrpc import PROTOCOL_VERSION_KEY, dumps, loads, strip_envelope
from toolmesh.api.mcp_http import STATELESS_ERA_VERSIONS, Refusal, SseEvent, is_stateless_era, stateless_refusal
from toolmesh.sidecar.errors import ProxyError
from toolmesh.sidecar.transports.base import UpstreamResponse, refused

if TYPE_CHECKING:
    from toolmesh.sidecar.transports.channel import Multiplexer

STATELESS_VERSION = STATELESS_ERA_VERSIONS[0]
"""The stateless-era version a bridge settles its channels in."""


def is_stateless_request(message: Any, headers: Mapping[str, str]) -> bool:
    """A request a bridge serves on a stateless-era channel: the era's header or envelope, or `server/discover`
    (which opens that era, and which a session-era channel would not know)."""
    if isinstance(message, dict) and message.get("method") == "server/discover":
        return True
    return is_stateless_era(message, headers)


def stateless_rejection(message: Any, headers: Mapping[str, str]) -> UpstreamResponse | None:
    """What a stateless-era server answers before dispatch (api.mcp_http.stateless_refusal). `initialize` is the one
    removed method refused here: over HTTP it is an unknown method (404), whatever a stdio child would say."""
    if not isinstance(message, dict) or "id" not in message or "method" not in message:
        return None  # notifications are acknowledged; other shapes are the upstream's to refuse
    refusal = stateless_refusal(message, headers, removed=("initialize",))
    return None if refusal is None else refused(message.get("id"), refusal)


def param_rejection(message: Mapping[str, Any], headers: Mapping[str, str], input_schema: Any) -> UpstreamResponse | None:
    """A tools/call whose `Mcp-Param-*` headers disagree with its arguments, as the tool's schema declares them."""
    params = message.get("params")
    arguments = params.get("arguments") if isinstance(params, Mapping) else None
    if input_schema is None or not isinstance(arguments if arguments is not None else {}, Mapping):
        return None
    rejected = validate_mcp_param_headers(input_schema, arguments or {}, headers)
    if not rejected:
        return None
    return refused(message.get("id"), Refusal(rejected.code, rejected.message, rejected.data))


def with_error_status(response: UpstreamResponse) -> UpstreamResponse:
    """A stateless-era JSON answer that is an error gets its code's HTTP status (404 for an unknown method, ...)."""
    body = response.body
    if body is not None and response.status == 200 and b'"error"' in body:
        message = response.message if response.message is not None else loads(body)
        error = message.get("error") if isinstance(message, dict) else None
        if isinstance(error, dict) and isinstance(error.get("code"), int):
            response.status = ERROR_CODE_HTTP_STATUS.get(error["code"], 200)
    return response


class ToolSchemas:
    """The upstream's tool input schemas from its own listing, for `Mcp-Param-*` checks; reused briefly."""

    FRESH = 30.0
    """Seconds a listing is reused before the next check lists again (an unknown tool always lists again)."""
    PAGES = 100
    """Most tools/list pages read; a paginator that never ends is cut off."""

    def __init__(self, mux: Multiplexer, timeout: float):
        self._mux = mux
        self._timeout = timeout
        self._schemas: dict[str, Any] = {}
        self._listed_at = 0.0

    async def get(self, tool: str, message: Mapping[str, Any]) -> Any:
        """`tool`'s inputSchema as listed for the caller's envelope; None when it cannot be had (checks fail open)."""
        now = time.monotonic()
        if tool not in self._schemas or now - self._listed_at > self.FRESH:
            meta = (message.get("params") or {}).get("_meta") or {}
            envelope = {k: v for k, v in meta.items() if k.startswith("io.modelcontextprotocol/")}
            schemas: dict[str, Any] = {}
            params: dict[str, Any] = {"_meta": envelope}
            try:
                for _ in range(self.PAGES):
                    answer = await self._mux.call_own("tools/list", params, self._timeout)
                    result = answer.get("result") or {}
                    schemas.update({t.get("name"): t.get("inputSchema") for t in result.get("tools", ())})
                    cursor = result.get("nextCursor")
                    if not isinstance(cursor, str):
                        break
                    params = {"_meta": envelope, "cursor": cursor}
            except (ProxyError, AttributeError, TypeError):
                return None
            self._schemas, self._listed_at = schemas, now
        return self._schemas.get(tool)


async def serve_stateless(mux: Multiplexer, schemas: ToolSchemas, message: Any, body: bytes | None,
                          headers: Mapping[str, str]) -> UpstreamResponse:
    """A stateless-era request on an upstream channel settled in that era, checked and answered as over HTTP."""
    tool = needs_param_check(message, headers)
    if tool is not None:
        rejected = param_rejection(message, headers, await schemas.get(tool, message))
        if rejected is not None:
            return rejected
    return with_error_status(await mux.post(message, None, body))


def needs_param_check(message: Any, headers: Mapping[str, str]) -> str | None:
    """The tool whose schema a stateless-era tools/call must be checked against, if a header or argument is at stake."""
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    params = message.get("params")
    name = params.get("name") if isinstance(params, dict) else None
    if not isinstance(name, str):
        return None
    if params.get("arguments") or any(k.lower().startswith("mcp-param-") for k in headers):
        return name
    return None


def without_envelope(message: dict[str, Any]) -> dict[str, Any]:
    """A stateless-era request as a session-era server takes it: `_meta` without the era's `io.modelcontextprotocol/*`."""
    params = message.get("params")
    if isinstance(params, dict):
        return {**message, "params": strip_envelope(params)}
    return message


_CACHEABLE = frozenset({"tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read"})
"""Stateless-era results that must say how long they may be cached."""


def _result_in_stateless_shape(data: bytes, method: str) -> bytes:
    message = loads(data)
    result = message.get("result") if isinstance(message, dict) and "method" not in message else None
    if not isinstance(result, dict):
        return data  # an error, or a notification on the way
    result.setdefault("resultType", "complete")
    if method in _CACHEABLE:
        # A session-era server gave no cache hints: say "do not cache", never more than it promised.
        result.setdefault("ttlMs", 0)
        result.setdefault("cacheScope", "private")
    return dumps(message)


def in_stateless_shape(response: UpstreamResponse, method: str) -> UpstreamResponse:
    """A session-era server's answer in stateless-era shape: `resultType`, and cache hints where that era needs them."""
    if response.body is not None:
        response.body = _result_in_stateless_shape(response.body, method)
        response.message = None
        return with_error_status(response)
    if response.events is not None:
        events = response.events

        async def reshaped() -> AsyncIterator[SseEvent]:
            async for event in events:
                if b'"result"' in event.data:
                    event = SseEvent(data=_result_in_stateless_shape(event.data, method), id=event.id,
                                     event=event.event, retry=event.retry)
                yield event

        response.events = reshaped()
    return response


def discover_params(client_info: Mapping[str, Any]) -> dict[str, Any]:
    """The params of the bridge's own `server/discover`, which settles a fresh channel in the stateless era."""
    return {"_meta": {
        PROTOCOL_VERSION_KEY: STATELESS_VERSION,
        "io.modelcontextprotocol/clientInfo": dict(client_info),
        "io.modelcontextprotocol/clientCapabilities": {},
    }}


def serves_stateless_era(answer: Mapping[str, Any]) -> bool:
    """Whether a `server/discover` answer names the stateless-era version this bridge speaks."""
    result = answer.get("result")
    return isinstance(result, Mapping) and STATELESS_VERSION in (result.get("supportedVersions") or ())

