"""JSON-RPC framing and Server-Sent Events: classify client messages, parse and re-encode SSE streams.

The HTTP layer moves bytes; this module knows just enough of JSON-RPC 2.0 and
SSE to route a message to the chain and relay a stream event by event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from toolmesh.api.jsonrpc import dumps as _dumps
from toolmesh.api.jsonrpc import loads as _loads
from toolmesh.sidecar.chain.frame import NOTIFICATION, REQUEST, RESPONSE
from toolmesh.sidecar.errors import INVALID_REQUEST, PARSE_ERROR, Refused

_EMPTY: Mapping[str, Any] = {}


class ParseError(Refused):
    """Give up: the body is not JSON (JSON-RPC -32700, HTTP 400)."""

    code = PARSE_ERROR


class InvalidRequest(Refused):
    """Give up: JSON, but not a JSON-RPC 2.0 message (JSON-RPC -32600, HTTP 400)."""

    code = INVALID_REQUEST


def loads(body: bytes) -> Any:
    """Parse a body as JSON; ParseError when it is not."""
    try:
        return _loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParseError(f"parse error: {exc}") from None


def classify(message: Any) -> tuple[str, str, Any, Mapping[str, Any]]:
    """(kind, method, id, params) of one client message; InvalidRequest when it is not JSON-RPC 2.0.

    Kinds are chain.REQUEST, NOTIFICATION and RESPONSE; a response's method is "".
    """
    if type(message) is not dict or message.get("jsonrpc") != "2.0":
        raise InvalidRequest("invalid request: not a JSON-RPC 2.0 message")
    method = message.get("method")
    if method is not None:
        if type(method) is not str or not method:
            raise InvalidRequest("invalid request: method must be a non-empty string")
        params = message.get("params", _EMPTY)
        if params is None:
            params = _EMPTY
        elif type(params) is not dict:
            raise InvalidRequest("invalid request: params must be an object")
        if "id" not in message:
            return NOTIFICATION, method, None, params
        request_id = message["id"]
        if type(request_id) not in (str, int):
            raise InvalidRequest("invalid request: id must be a string or an integer")
        return REQUEST, method, request_id, params
    if "id" in message and ("result" in message or "error" in message):
        return RESPONSE, "", message["id"], _EMPTY
    raise InvalidRequest("invalid request: neither a request, a notification nor a response")


def request_id_of(message: Any) -> Any:
    """The id of a message if it has a usable one (for error answers), else None."""
    if type(message) is dict:
        request_id = message.get("id")
        if type(request_id) in (str, int):
            return request_id
    return None


def serialise_request(method: str, request_id: Any, params: Mapping[str, Any], *, notification: bool = False) -> bytes:
    """A request (or notification) rebuilt after a stage changed its params."""
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if not notification:
        message["id"] = request_id
    if params:
        message["params"] = params
    return _dumps(message)


