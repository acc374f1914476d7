"""Which outcomes count as a transient upstream failure: what retry repeats and what trips a circuit breaker."""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from toolmesh.sidecar.chain.frame import Outcome, header
from toolmesh.sidecar.errors import INTERNAL_ERROR, UpstreamTimeout, UpstreamUnavailable

TRANSIENT_STATUSES = frozenset({502, 503, 504})
"""HTTP statuses from the upstream that say "try again", not "you asked wrongly"."""


def is_transient_error(exc: BaseException) -> bool:
    """Transport failures and timeouts."""
    return isinstance(exc, (UpstreamUnavailable, UpstreamTimeout))


def raise_if_unreadable(outcome: Outcome) -> Outcome:
    """Turn a 200 answer whose body is not JSON into the transport failure it is (502); pass anything else."""
    if outcome.message is None and outcome.status == 200 and outcome.raw:
        # The HTTP layer parses every tools/call answer it can; an unparsed 200 body is broken or truncated.
        try:
            orjson.loads(outcome.raw)
        except orjson.JSONDecodeError:
            raise UpstreamUnavailable("upstream answered with a body that is not JSON-RPC") from None
    return outcome


def is_transient_outcome(outcome: Outcome) -> bool:
    """A 502/503/504 answer, or a JSON-RPC internal error (-32603). Tool errors (`isError`) are answers, not failures."""
    if outcome.status in TRANSIENT_STATUSES:
        return True
    message = outcome.message
    if message is None:
        raw = outcome.raw
        # Only bodies that can hold an error are parsed: the success path stays free of JSON work.
        if not raw or b'"error"' not in raw:
            return False
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return False
    if not isinstance(message, Mapping):
        return False
    error = message.get("error")
    return isinstance(error, Mapping) and error.get("code") == INTERNAL_ERROR


def retry_after_seconds(outcome: Outcome) -> float | None:
    """The upstream's `Retry-After` in seconds (delta-seconds form), if it sent one."""
    value = header(outcome.headers, "Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
