"""The policy chain's frame: the call context, the outcome, and the one place the stage order is written.

Every JSON-RPC request the sidecar acts on runs through the chain:

    observe → authenticate → authorize → rate limit → quota → budget → cache
            → timeout/progress → retry → circuit breaker → upstream

A stage is any object with `async def __call__(ctx, call_next) -> Outcome`.
The context is frozen; a stage that learns something (the caller's identity,
say) passes `derive(ctx, ...)` (a faster `dataclasses.replace`) to `call_next`. Stages never see
HTTP: they raise the typed errors of `toolmesh.sidecar.errors`, and the one
error boundary (`run_chain`) turns those into JSON-RPC errors and HTTP statuses.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TYPE_CHECKING

from toolmesh.api.mcp_http import SseEvent, header
from toolmesh.sidecar.errors import INTERNAL_ERROR, ClientGone, ProxyError, error_message
from toolmesh.sidecar.outcome import JsonRpcId, Outcome

if TYPE_CHECKING:
    from toolmesh.api.policy import MCPToolPolicySpec

log = logging.getLogger("toolmesh.sidecar")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, as verified by the authenticate stage."""

    subject: str
    """The token's `sub`, or "anonymous" when the policy has no auth."""
    scopes: frozenset[str] = frozenset()
    """Scopes from the issuer's `scopeClaim`, else the token's `scope` (space-separated) or `scp` (list)."""
    issuer: str | None = None
    """The token's `iss`."""
    expires_at: float | None = None
    """The token's `exp` as a Unix time; caches keyed by caller expire with it."""


@dataclass(slots=True)
class CallRecord:
    """What stages learn of one call for the observe stage's log line and figures; the one mutable thing a context carries."""

    caller: Caller | None = None
    """Set by the authenticate stage once it verified the caller."""
    result_tokens: int | None = None
    """Tokens of the tool result charged to the caller's budget; set by the budget stage (none without one)."""
    truncated: bool = False
    """Set by the budget stage when it cut the result to fit."""


Emit = Callable[[SseEvent], Awaitable[None]]
"""Sends one event to the client now (notifications and server requests that arrive before the result)."""


async def _no_emit(event: SseEvent) -> None:
    return None


StartStream = Callable[[Mapping[str, str]], Awaitable[None]]
"""Starts the client's SSE response now, with the upstream's response headers (Mcp-Session-Id, ...); idempotent."""


async def _no_start_stream(headers: Mapping[str, str]) -> None:
    return None


# What an HTTP request to /mcp carries; every kind runs through the chain, so a stage that
# must see everything (authenticate) does, and the others skip what they do not govern.
REQUEST = "request"
"""A JSON-RPC request (method and id): the client waits for its response."""
NOTIFICATION = "notification"
"""A JSON-RPC notification (method, no id); the upstream answers 202."""
RESPONSE = "response"
"""The client's JSON-RPC response to a server request (sampling, elicitation); `method` is ""."""
STREAM = "stream"
"""A GET opening the server's SSE stream; `method` is "" and events flow through `emit`."""
SESSION_END = "session-end"
"""A DELETE ending the session; `method` is ""."""


@dataclass(frozen=True, slots=True)
class CallContext:
    """One JSON-RPC request on its way through the chain. Frozen: stages derive new ones with `replace`."""

    method: str
    """The JSON-RPC method, e.g. "tools/call"."""
    request_id: JsonRpcId
    """The client's JSON-RPC id; a response always carries this one back."""
    params: Mapping[str, Any]
    """The request's params, parsed (empty mapping when absent)."""
    raw: bytes
    """The request exactly as received; forwarded byte for byte unless a stage changed `params`."""
    headers: Mapping[str, str]
    """The client's HTTP request headers (case-insensitive mapping)."""
    session_id: str | None = None
    """`Mcp-Session-Id`, None in the stateless era."""
    protocol_version: str | None = None
    """`MCP-Protocol-Version` header, or `params._meta` protocol version in the stateless era."""
    caller: Caller | None = None
    """Set by the authenticate stage."""
    policy: MCPToolPolicySpec | None = None
    """The frozen policy snapshot in force when the call arrived (None for pass-through)."""
    emit: Emit = _no_emit
    """Sends notifications/server requests to the client while the call runs."""
    started: float = field(default_factory=time.monotonic)
    """When the sidecar received the request (monotonic seconds)."""
    params_changed: bool = False
    """True when a stage rewrote `params`: the upstream stage then re-serialises instead of forwarding `raw`."""
    kind: str = REQUEST
    """REQUEST, NOTIFICATION, RESPONSE, STREAM or SESSION_END (see above)."""
    start_stream: StartStream = _no_start_stream
    """Opens the client's SSE response with the upstream's headers before the first `emit`."""
    record: CallRecord | None = None
    """Set by the observe stage for tools/call and calls it logs; stages further in note there what it cannot see itself."""
    message: Mapping[str, Any] | None = None
    """The message as parsed from `raw` (never changed): a transport that routes messages reads this, not `raw`."""

    @property
    def tool(self) -> str | None:
        """The tool name of a tools/call, else None."""
        if self.method == "tools/call":
            name = self.params.get("name")
            return name if isinstance(name, str) else None
        return None

    @property
    def progress_token(self) -> str | int | None:
        """The client's `params._meta.progressToken`, if it asked for progress."""
        meta = self.params.get("_meta")
        if isinstance(meta, Mapping):
            token = meta.get("progressToken")
            if isinstance(token, (str, int)):
                return token
        return None


_CONTEXT_FIELDS = tuple(CallContext.__dataclass_fields__)
_context_values = operator.attrgetter(*_CONTEXT_FIELDS)
_set_field = object.__setattr__


def derive(ctx: CallContext, **changes: Any) -> CallContext:
    """`dataclasses.replace(ctx, **changes)` at half the cost: stages derive a context on every request."""
    new = object.__new__(CallContext)
    for name, value in zip(_CONTEXT_FIELDS, _context_values(ctx)):
        _set_field(new, name, value)
    for name, value in changes.items():
        if name not in CallContext.__dataclass_fields__:
            raise TypeError(f"CallContext has no field {name!r}")
        _set_field(new, name, value)
    return new


Handler = Callable[[CallContext], Awaitable[Outcome]]


class Stage(Protocol):
    """One policy concern. Reads the frozen context and policy; calls `call_next` or answers itself."""

    async def __call__(self, ctx: CallContext, call_next: Handler) -> Outcome: ...


def compose(stages: Sequence[Stage], terminal: Handler) -> Handler:
    """Chain `stages` (outermost first) in front of `terminal` (the upstream call)."""
    handler = terminal
    for stage in reversed(stages):
        handler = _bind(stage, handler)
    return handler


class _Bound:
    """A stage with its `call_next` fixed: calling it returns the stage's own coroutine (no wrapper frame per stage)."""

    __slots__ = ("stage", "call_next")

    def __init__(self, stage: Stage, call_next: Handler):
        self.stage = stage
        self.call_next = call_next

    def __call__(self, ctx: CallContext) -> Awaitable[Outcome]:
        return self.stage(ctx, self.call_next)


def _bind(stage: Stage, call_next: Handler) -> Handler:
    return _Bound(stage, call_next)


# The order of the chain, written once. Each name is a module in chain/stages/
# exposing `build(policy, shared) -> Stage | None` (see state.py); the pipeline
# assembles the chain in this order and leaves out the stages that return None.
STAGE_ORDER: tuple[str, ...] = (
    "observe",
    "authenticate",
    "authorize",
    "rate_limit",
    # Quota after the rate limit (a call refused for its rate uses none of a quota) and outside the budget,
    # which counts the result's tokens a token quota adds once the call is done.
    "quota",
    # Budget before cache: a cached answer still enters the caller's context, so it is
    # counted and truncated per session, and the cache only ever holds upstream results
    # (never one caller's truncation link or remaining-budget figure).
    "budget",
    "cache",
    "timeout",
    "retry",
    "circuit_breaker",
)


async def run_chain(handler: Handler, ctx: CallContext) -> Outcome:
    """The one error boundary: typed errors become JSON-RPC errors with the caller's id and an HTTP status."""
    try:
        return await handler(ctx)
    except ClientGone:
        raise
    except ProxyError as exc:
        return exc.to_outcome(ctx.request_id)
    except Exception as exc:  # noqa: BLE001 - the boundary: nothing escapes to the HTTP layer
        return internal_error(ctx.request_id, exc)


def internal_error(request_id: JsonRpcId, exc: BaseException) -> Outcome:
    """Report a bug as a JSON-RPC internal error; logged with its traceback, never shown to the client."""
    log.exception("internal error while handling request %r", request_id, exc_info=exc)
    return Outcome(message=error_message(request_id, INTERNAL_ERROR, "internal proxy error"), status=500)
