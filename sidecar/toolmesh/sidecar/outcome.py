"""What the chain answers for one request, below both the chain and its errors (each error turns into one)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from toolmesh.api.jsonrpc import dumps, loads

JsonRpcId = str | int | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the chain answers for one request: a JSON-RPC response, already parsed or still raw."""

    message: Mapping[str, Any] | None = None
    """The parsed JSON-RPC response ({"jsonrpc", "id", "result"|"error"}), when some stage needed it parsed."""
    raw: bytes | None = None
    """The upstream's response bytes, relayed as-is when no stage parsed or changed them."""
    status: int = 200
    """HTTP status for the client (200 unless an error maps to another)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Upstream response headers to relay (Mcp-Session-Id, ...)."""
    event_id: str | None = None
    """SSE id of the event that carried the response, when the upstream streamed it."""
    streamed: bool = False
    """True when the upstream answered with an SSE stream; the client then gets one too."""

    def body(self) -> bytes | None:
        """The bytes the client gets: `raw` when set, else `message` serialised.

        A stage that changes `message` must set `raw=None` (`dataclasses.replace(outcome,
        message=new, raw=None)`), or the client would still get the upstream's bytes.
        """
        if self.raw is not None:
            return self.raw
        if self.message is not None:
            return dumps(self.message)
        return None

    def parsed(self) -> Any:
        """`message`, else `raw` parsed; None when there is neither or `raw` is not JSON (the stage then relays it)."""
        if self.message is not None:
            return self.message
        if not self.raw:
            return None
        try:
            return loads(self.raw)
        except orjson.JSONDecodeError:
            return None

    @property
    def is_error(self) -> bool:
        """True for a JSON-RPC error or a tool result with `isError: true`."""
        msg = self.message
        if msg is None:
            return False
        if "error" in msg:
            return True
        result = msg.get("result")
        return isinstance(result, Mapping) and result.get("isError") is True
