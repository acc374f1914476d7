"""JSON-RPC error codes, the error answer toolmesh sends, and the 2026-07-28 envelope: the same from the sidecar
and from the gateway."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson

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


# The 2026-07-28 (stateless era) envelope: keys in a request's `params._meta`.
ENVELOPE_PREFIX = "io.modelcontextprotocol/"
PROTOCOL_VERSION_KEY = ENVELOPE_PREFIX + "protocolVersion"
"""The envelope key naming the protocol version a request speaks; its presence marks a 2026-07-28 request."""
SUBSCRIPTION_ID_KEY = ENVELOPE_PREFIX + "subscriptionId"
"""The `_meta` key tagging every frame of a `subscriptions/listen` stream with the listen request's id."""


def has_envelope(params: Any) -> bool:
    """Whether request `params` carry the 2026-07-28 envelope."""
    meta = params.get("_meta") if isinstance(params, Mapping) else None
    return isinstance(meta, Mapping) and PROTOCOL_VERSION_KEY in meta


def strip_envelope(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `params` as a session-era server takes them: `_meta` without the envelope's keys (and without
    `_meta` when nothing else was in it). Everything else in `_meta` (progressToken, trace context) stays."""
    forwarded = dict(params)
    meta = forwarded.get("_meta")
    if isinstance(meta, Mapping):
        kept = {k: v for k, v in meta.items() if not k.startswith(ENVELOPE_PREFIX)}
        if kept:
            forwarded["_meta"] = kept
        else:
            del forwarded["_meta"]
    return forwarded


# --- JSON as sent: integers of any size stay exact -------------------------------------------

_DIGITS_ONLY = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
"""A translation table keeping digits as "0" and anything else as a space."""
_TWENTY_DIGITS = b"0" * 20
"""Twenty digits in a row (after `_DIGITS_ONLY`): perhaps an integer beyond 64 bits, which orjson reads as a float."""


def loads(data: bytes | str) -> Any:
    """Parse JSON (orjson.JSONDecodeError when it is not), keeping integers beyond 64 bits exact.

    orjson reads an integer beyond unsigned 64 bits as a float (`1180591620717411303424` →
    `1.1805916207174113e+21`): re-serialised, the upstream would get another number, and two
    arguments would share a cache key. A body with such a run of digits anywhere (rare) is
    parsed again by the standard library, which keeps every integer exact.
    """
    value = orjson.loads(data)
    # A byte translation and a substring search: about 1 ms per MB, where a regex takes 20.
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) >= 20 and _TWENTY_DIGITS in raw.translate(_DIGITS_ONLY):
        return json.loads(data)
    return value


def dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    """Serialise compact UTF-8 JSON; integers beyond 64 bits (from `loads`) are written exactly."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except orjson.JSONEncodeError as exc:
        if "64-bit" not in str(exc):
            raise
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys,
                          allow_nan=False).encode()
