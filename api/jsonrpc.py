"""JSON-RPC error codes and the error answer toolmesh sends, the same from the sidecar and from the gateway."""

from __future__ import annotations

from typing import Any

# JSON-RPC 2.0 codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Implementation-defined server errors (-32000 .. -32099) used by toolmesh.
UPSTREAM_UNAVAILABLE = -32001
UPSTREAM_TIMEOUT = -32002
UNAUTHORIZED = -32003
FORBIDDEN = -32004
RATE_LIMITED = -32005
CIRCUIT_OPEN = -32006
BUDGET_EXHAUSTED = -32007


def error_message(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    """A JSON-RPC error response for `request_id`."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}
