"""Assembles the policy chain from a policy snapshot, swaps it atomically on reload, and ends it at the upstream.

The stages come from the convention in `state.py`: for each name in
`chain.STAGE_ORDER`, `toolmesh.sidecar.chain.stages.<name>.build(policy, shared)`
returns a stage or None. The terminal handler (`UpstreamCall`) forwards the
client's bytes untouched unless a stage changed the params, relays SSE events
through `ctx.emit` as they arrive, and records the upstream's tool listings.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, TYPE_CHECKING

import orjson

from toolmesh.api.jsonrpc import loads
from toolmesh.sidecar.chain.frame import (
    NOTIFICATION,
    REQUEST,
    RESPONSE,
    SESSION_END,
    STAGE_ORDER,
    STREAM,
    CallContext,
    Caller,
    Handler,
    Outcome,
    Stage,
    compose,
)
from toolmesh.sidecar.chain.jsonrpc import serialise_request
from toolmesh.sidecar.chain.state import SharedState
from toolmesh.sidecar.transports.base import Upstream, UpstreamResponse

if TYPE_CHECKING:
    from toolmesh.api.policy import MCPToolPolicySpec

log = logging.getLogger("toolmesh.sidecar.pipeline")

# Request headers that describe one hop or that the sidecar sets itself. Origin is the sidecar's
# to check (its allow-list); forwarding it would make a localhost-only upstream refuse origins the
# sidecar was configured to allow.
_NOT_FORWARDED = frozenset({
    "host", "origin", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "content-length", "accept-encoding", "expect",
})

# Methods whose answers the sidecar parses on the way back (stages read them; tools/list feeds the catalogue).
_NOT_FORWARDED_WITH_IDENTITY = _NOT_FORWARDED | {"authorization"}

# Header name (as spelled by clients) -> forwarded or not, without and with a verified caller.
_FORWARDED_ANONYMOUS: dict[str, bool] = {}
_FORWARDED_IDENTIFIED: dict[str, bool] = {}
_MAX_VERDICTS = 1024
"""Distinct header names remembered; beyond that a name is judged on every call (a client cannot grow memory)."""

_PARSED_RESULTS = frozenset({"tools/list", "tools/call", "initialize"})

_LIST_CHANGED = b"notifications/tools/list_changed"


def _ours(lowered: str) -> bool:
    """An identity header of ours, however spelled: CGI and WSGI servers read `X_Toolmesh_Subject` as
    `X-Toolmesh-Subject`, so an underscore spelling is as much a spoof as the real one."""
    return lowered.replace("_", "-").startswith("x-toolmesh-")


def forward_headers(headers: Mapping[str, str], caller: Caller | None = None) -> dict[str, str]:
    """The client's headers as the upstream gets them: everything end-to-end, Mcp-* included.

    X-Toolmesh-* carry the caller's identity: a client's are always dropped, and once the
    authenticate stage verified a `caller` its subject and scopes go instead of the client's
    Authorization (the token was for this sidecar, not for the upstream).
    """
    dropped = _NOT_FORWARDED if caller is None else _NOT_FORWARDED_WITH_IDENTITY
    connection = headers.get("Connection")
    if connection and connection.lower() not in ("keep-alive", "close"):
        # Headers the client named in Connection are for this hop only (RFC 9110 7.6.1).
        dropped = dropped | {name.strip().lower() for name in connection.split(",")}
        out = {k: v for k, v in headers.items() if (lowered := k.lower()) not in dropped and not _ours(lowered)}
    else:
        # Clients send the same few header names on every call: each name is judged once.
        verdicts = _FORWARDED_ANONYMOUS if caller is None else _FORWARDED_IDENTIFIED
        out = {}
        for k, v in headers.items():
            keep = verdicts.get(k)
            if keep is None:
                lowered = k.lower()
                keep = lowered not in dropped and not _ours(lowered)
                if len(verdicts) < _MAX_VERDICTS:
                    verdicts[k] = keep
            if keep:
                out[k] = v
    if caller is None:
        return out
    out["X-Toolmesh-Subject"] = caller.subject
    out["X-Toolmesh-Scopes"] = " ".join(sorted(caller.scopes))
    return out


class UpstreamCall:
    """The chain's terminal handler: one call to the `Upstream`."""

    def __init__(self, upstream: Upstream, shared: SharedState):
        self.upstream = upstream
        self.shared = shared

    async def __call__(self, ctx: CallContext) -> Outcome:
        kind = ctx.kind
        headers = forward_headers(ctx.headers, ctx.caller)
        if kind == REQUEST:
            if ctx.params_changed:
                request = serialise_request(ctx.method, ctx.request_id, ctx.params)
                return await self._request(ctx, await self.upstream.post(request, headers))
            return await self._request(ctx, await self.upstream.post(ctx.raw, headers, ctx.message))
        if kind == NOTIFICATION or kind == RESPONSE:
            body = ctx.raw
            if ctx.params_changed and kind == NOTIFICATION:
                body = serialise_request(ctx.method, None, ctx.params, notification=True)
            return await self._whole(await self.upstream.post(body, headers))
        if kind == STREAM:
            return await self._stream(ctx, await self.upstream.get(headers))
        if kind == SESSION_END:
            return await self._whole(await self.upstream.delete(headers))
        raise ValueError(f"unknown call kind {kind!r}")

    async def _request(self, ctx: CallContext, resp: UpstreamResponse) -> Outcome:
        if resp.events is None:
            try:
                return self._answer(ctx, resp.body, resp)
            finally:
                await resp.release()
        request_id = ctx.request_id
        try:
            await ctx.start_stream(resp.headers)
            async for event in resp.events:
                data = event.data
                # Cheap test first: only a message without "method" can be our response.
                if data and b'"method"' not in data:
                    try:
                        message = loads(data)
                    except orjson.JSONDecodeError:
                        message = None
                    if type(message) is dict and message.get("id") == request_id and (
                            "result" in message or "error" in message):
                        outcome = self._answer(ctx, data, resp, message)
                        return Outcome(message=outcome.message, raw=data, status=resp.status, headers=resp.headers,
                                       event_id=event.id, streamed=True)
                elif data and _LIST_CHANGED in data:
                    self.shared.tools.mark_stale()
                await ctx.emit(event)
            # The upstream ended the stream before answering (SSE polling): the client resumes with GET.
            return Outcome(status=resp.status, headers=resp.headers, streamed=True)
        finally:
            await resp.release()

    def _answer(self, ctx: CallContext, body: bytes | None, resp: UpstreamResponse,
                message: Any = None) -> Outcome:
        if ctx.method in _PARSED_RESULTS and body and resp.status == 200:
            if message is None:
                message = resp.message
            if message is None:
                try:
                    message = loads(body)
                except orjson.JSONDecodeError:
                    message = None
            if type(message) is dict:
                if ctx.method == "tools/list":
                    self._record_tools(ctx, message)
                return Outcome(message=message, raw=body, status=resp.status, headers=resp.headers)
        return Outcome(raw=body, status=resp.status, headers=resp.headers)

    def _record_tools(self, ctx: CallContext, message: Mapping[str, Any]) -> None:
        result = message.get("result")
        if not isinstance(result, Mapping):
            return
        tools = result.get("tools")
        if isinstance(tools, list):
            first_page = not ctx.params.get("cursor")
            complete = first_page and not result.get("nextCursor")
            self.shared.tools.update([t for t in tools if isinstance(t, Mapping)], complete=complete)

    async def _whole(self, resp: UpstreamResponse) -> Outcome:
        if resp.events is not None:
            # An upstream answering a notification with a stream: relay nothing, free the connection.
            await resp.release()
            return Outcome(status=202 if resp.status == 200 else resp.status, headers=resp.headers)
        await resp.release()
        return Outcome(raw=resp.body or None, status=resp.status, headers=resp.headers)

    async def _stream(self, ctx: CallContext, resp: UpstreamResponse) -> Outcome:
        if resp.events is None:
            await resp.release()
            return Outcome(raw=resp.body or None, status=resp.status, headers=resp.headers)
        try:
            await ctx.start_stream(resp.headers)
            async for event in resp.events:
                if _LIST_CHANGED in event.data:
                    self.shared.tools.mark_stale()
                await ctx.emit(event)
            return Outcome(status=resp.status, headers=resp.headers, streamed=True)
        finally:
            await resp.release()


# Without a policy the sidecar is a pass-through with observability only (README); the policy
# stages are not even imported then, which keeps an unconfigured sidecar small and quick to start.
UNCONDITIONAL_STAGES = frozenset({"observe"})


def build_stages(policy: MCPToolPolicySpec | None, shared: SharedState) -> list[Stage]:
    """The stages this policy asks for, in chain order (each stage module is imported when first needed)."""
    stages: list[Stage] = []
    for name in STAGE_ORDER:
        if policy is None and name not in UNCONDITIONAL_STAGES:
            continue
        module = importlib.import_module(f"toolmesh.sidecar.chain.stages.{name}")
        stage = module.build(policy, shared)
        if stage is not None:
            stages.append(stage)
    return stages


class Pipeline:
    """The chain in force. `swap(policy)` rebuilds it and replaces it in one assignment; calls in flight finish on the old one."""

    def __init__(self, terminal: Handler, shared: SharedState, policy: MCPToolPolicySpec | None = None):
        self.terminal = terminal
        self.shared = shared
        self.policy: MCPToolPolicySpec | None = None
        self.stages: list[Stage] = []
        self.handler: Handler = terminal
        self.generation = 0
        """Bumped on every successful swap."""
        self._listeners: list[Callable[[MCPToolPolicySpec | None], None]] = []
        self.swap(policy)

    def swap(self, policy: MCPToolPolicySpec | None) -> None:
        """Build the chain for `policy` and put it in force. If a stage refuses the policy, the old chain stays and the error propagates."""
        stages = build_stages(policy, self.shared)
        handler = compose(stages, self.terminal)
        # One tuple of assignments with no await between: a request sees the old chain or the new one.
        self.policy, self.stages, self.handler = policy, stages, handler
        self.generation += 1
        log.info("policy in force", extra={"event": "policy_swapped", "generation": self.generation,
                                            "stages": [type(s).__name__ for s in stages]})
        for listener in list(self._listeners):
            try:
                listener(policy)
            except Exception:  # noqa: BLE001 - a listener's bug must not undo a good swap
                log.exception("policy listener failed")

    def on_swap(self, listener: Callable[[MCPToolPolicySpec | None], None]) -> None:
        """Call `listener(policy)` after every successful swap (heartbeats, metrics)."""
        self._listeners.append(listener)

