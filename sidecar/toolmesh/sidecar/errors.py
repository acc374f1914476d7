"""Errors the chain raises, typed by what the caller should do next, and their JSON-RPC/HTTP form."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from toolmesh.api.jsonrpc import (  # noqa: F401 - the codes are part of this module's interface
    BUDGET_EXHAUSTED,
    CIRCUIT_OPEN,
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    RATE_LIMITED,
    UNAUTHORIZED,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    error_message,
)
from toolmesh.api.jsonrpc import dumps as _dumps
from toolmesh.sidecar.outcome import JsonRpcId, Outcome

log = logging.getLogger("toolmesh.sidecar")


class ProxyError(Exception):
    """Base: the call ends here with a JSON-RPC error and an HTTP status."""

    status = 500
    code = INTERNAL_ERROR

    def __init__(self, message: str, *, data: Any = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.data = data
        self.headers = dict(headers or {})

    def to_outcome(self, request_id: JsonRpcId) -> Outcome:
        return Outcome(
            message=error_message(request_id, self.code, self.message, self.data),
            status=self.status,
            headers=self.headers,
        )


class Refused(ProxyError):
    """Give up: the request is not allowed as sent (bad input, no permission). Retrying the same request is pointless."""

    status = 400
    code = INVALID_REQUEST


class Unauthenticated(Refused):
    """Give up until the caller brings a valid token (HTTP 401)."""

    status = 401
    code = UNAUTHORIZED


class SessionNotFound(Refused):
    """Give up on this session and open a new one: it ended, or it was never this caller's (HTTP 404)."""

    status = 404
    code = INVALID_REQUEST


class Forbidden(Refused):
    """Give up: the caller's token lacks a scope this call needs (HTTP 403)."""

    status = 403
    code = FORBIDDEN


class RetryLater(ProxyError):
    """Retry after `retry_after` seconds: rate limited, breaker open, upstream overloaded."""

    status = 429
    code = RATE_LIMITED

    def __init__(self, message: str, *, retry_after: float, data: Any = None, headers: Mapping[str, str] | None = None):
        merged = {"Retry-After": str(max(1, int(retry_after + 0.999)))}
        merged.update(headers or {})
        payload = {"retryAfterSeconds": round(retry_after, 3)}
        if isinstance(data, Mapping):
            payload.update(data)
        super().__init__(message, data=payload, headers=merged)
        self.retry_after = retry_after


class UpstreamUnavailable(ProxyError):
    """Retryable transport failure: the upstream could not be reached or broke the connection (HTTP 502)."""

    status = 502
    code = UPSTREAM_UNAVAILABLE


class StoreUnavailableError(ProxyError):
    """Retry shortly: the shared store a policy section needs did not answer, and it says deny (HTTP 503)."""

    status = 503
    code = UPSTREAM_UNAVAILABLE

    def __init__(self, message: str):
        super().__init__(message, headers={"Retry-After": "1"})


class UpstreamTimeout(ProxyError):
    """Retryable: the upstream did not answer in time (HTTP 504)."""

    status = 504
    code = UPSTREAM_TIMEOUT


class ClientGone(Exception):
    """The client closed its connection mid-answer: stop the call and free the upstream; nobody is left to answer."""


def dumps(message: Any) -> bytes:
    """Serialise a JSON-RPC message (compact, UTF-8; integers of any size exact)."""
    return _dumps(message)
