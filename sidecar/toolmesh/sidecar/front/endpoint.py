"""The `/mcp` endpoint: Streamable HTTP in front, every client message through the chain, SSE relayed event by event.

This layer knows HTTP (statuses, headers, streaming) and nothing of policy:
it checks what the transport spec asks of a server (Origin, Content-Type,
Accept, body size), turns each JSON-RPC message into a `CallContext`, runs
the chain and writes the `Outcome` back, as JSON or as SSE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from toolmesh.api.jsonrpc import PROTOCOL_VERSION_KEY
from toolmesh.api.mcp_http import NAME_BEARING_METHODS, OriginPolicy, encode_header_value, encode_sse
from toolmesh.sidecar.chain.frame import (
    REQUEST,
    SESSION_END,
    STREAM,
    CallContext,
    Outcome,
    SseEvent,
    run_chain,
)
from toolmesh.sidecar.errors import ClientGone, Refused, error_message, dumps
from toolmesh.sidecar.chain.jsonrpc import InvalidRequest, classify, loads, request_id_of
from toolmesh.sidecar.chain.pipeline import Pipeline
from toolmesh.sidecar.settings import SidecarSettings

log = logging.getLogger("toolmesh.sidecar.proxy")

# Our own headers on a response: never taken from the upstream's.
_OWN = frozenset({"content-type", "content-length", "cache-control"})
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache, no-transform",
                "X-Accel-Buffering": "no"}


class OriginNotAllowed(Refused):
    """Give up: a browser page from an origin the sidecar does not trust (HTTP 403, DNS rebinding)."""

    status = 403


class BodyTooLarge(Refused):
    """Give up: the request body is over `--max-body-bytes` (HTTP 413)."""

    status = 413


class BodyTimeout(Refused):
    """Give up: the client stopped sending its body (HTTP 408)."""

    status = 408


class UnsupportedMediaType(Refused):
    """Give up: POST bodies must be `application/json` (HTTP 415)."""

    status = 415


class NotAcceptable(Refused):
    """Give up: the client does not accept what an MCP server answers with (HTTP 406)."""

    status = 406


def _accepts(accept: str) -> tuple[bool, bool]:
    """(json, sse) acceptable, with wildcards, as the MCP SDK servers read Accept."""
    types = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    wildcard = "*/*" in types
    return (wildcard or "application/json" in types or "application/*" in types,
            wildcard or "text/event-stream" in types or "text/*" in types)


_UNJUDGED = object()
_MAX_VERDICTS = 256
"""Distinct (Content-Type, Accept) combinations remembered; beyond that each is judged on every call."""


def _media_verdict(content_type: str, accept: str, need_json: bool, need_sse: bool) -> tuple[type[Refused], str] | None:
    """None when a request with these Content-Type and Accept headers may go on, else (error class, message)."""
    if need_json and content_type.split(";", 1)[0].strip().lower() != "application/json":
        return UnsupportedMediaType, "unsupported media type: POST bodies must be application/json"
    json_ok, sse_ok = _accepts(accept)
    if (need_json and not json_ok) or (need_sse and not sse_ok):
        wanted = "application/json and text/event-stream" if need_json else "text/event-stream"
        return NotAcceptable, f"not acceptable: the client must accept {wanted}"
    return None


def _error_response(exc: Refused, request_id: Any = None) -> web.Response:
    body = dumps(error_message(request_id, exc.code, exc.message, exc.data))
    return web.Response(body=body, status=exc.status, content_type="application/json", headers=exc.headers or None)


class ClientStream:
    """The client's SSE response, opened on first use: the upstream's headers first, then events as they come."""

    __slots__ = ("request", "response", "keepalive", "_last_write", "_pinger")

    def __init__(self, request: web.Request, keepalive: float | None = None):
        self.request = request
        self.response: web.StreamResponse | None = None
        self.keepalive = keepalive
        """Seconds of silence after which a comment is sent, so idle-timeout middleboxes keep the stream open."""
        self._last_write = 0.0
        self._pinger: asyncio.Task | None = None

    async def start(self, headers: Mapping[str, str]) -> None:
        if self.response is not None:
            return
        response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        for name, value in headers.items():
            if name.lower() not in _OWN:
                response.headers[name] = value
        try:
            await response.prepare(self.request)
        except ConnectionError:
            raise ClientGone() from None
        self.response = response
        if self.keepalive:
            self._last_write = time.monotonic()
            self._pinger = asyncio.get_running_loop().create_task(self._ping(response, self.keepalive))

    async def _ping(self, response: web.StreamResponse, every: float) -> None:
        while True:
            await asyncio.sleep(max(0.0, self._last_write + every - time.monotonic()))
            if time.monotonic() - self._last_write >= every:
                try:
                    await response.write(b": keep-alive\n\n")
                except ConnectionError:
                    return
                self._last_write = time.monotonic()

    async def emit(self, event: SseEvent) -> None:
        if self.response is None:
            await self.start({})
        try:
            await self.response.write(encode_sse(event))
        except ConnectionError:
            raise ClientGone() from None
        if self._pinger is not None:
            self._last_write = time.monotonic()

    def stop(self) -> None:
        """Stop the keep-alive comments (the stream is ending or the client left)."""
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None

    async def close(self) -> web.StreamResponse:
        self.stop()
        try:
            await self.response.write_eof()
        except ConnectionError:
            pass
        return self.response


_BATCH_SLICE = 16
"""Batch messages run between two yields to the event loop."""

_ROUTING_HEADERS_SINCE = "2026-07-28"


def _routing_headers(headers: Mapping[str, str], method: str, params: Mapping[str, Any]) -> CIMultiDict[str]:
    """The client's headers with Mcp-Method/Mcp-Name describing one message of a split batch."""
    out = CIMultiDict(headers)
    out.popall("Mcp-Method", None)
    out.popall("Mcp-Name", None)
    # A method no HTTP field can carry cannot be routed; the upstream then refuses that one message.
    if method and method.isascii() and method.isprintable():
        out["Mcp-Method"] = method
        name = params.get(NAME_BEARING_METHODS.get(method, ""))
        if type(name) is str:
            out["Mcp-Name"] = encode_header_value(name)
    return out


def _plain_response(outcome: Outcome, body: bytes | None, default_status: int = 200) -> web.Response:
    headers = {k: v for k, v in outcome.headers.items() if k.lower() not in _OWN}
    if body is None:
        return web.Response(status=outcome.status if outcome.status != 200 else default_status, headers=headers)
    headers["Content-Type"] = "application/json"
    return web.Response(body=body, status=outcome.status, headers=headers)


class McpEndpoint:
    """Handlers for POST, GET and DELETE on `/mcp`."""

    def __init__(self, pipeline: Pipeline, settings: SidecarSettings):
        self.pipeline = pipeline
        self.settings = settings
        self._origins = OriginPolicy(settings.allowed_origins)
        self._media_verdicts: dict[tuple[str, str, bool, bool], tuple[type[Refused], str] | None] = {}

    # -- checks the transport spec asks of a server ----------------------------------------

    def _check(self, request: web.Request, *, need_json: bool, need_sse: bool) -> None:
        headers = request.headers
        origin = headers.get("Origin")
        if not self._origins.allows(origin):
            raise OriginNotAllowed("origin not allowed")
        content_type = headers.get("Content-Type", "") if need_json else ""
        accept = headers.get("Accept", "")
        # A client sends the same few header values on every call: judge each combination once.
        key = (content_type, accept, need_json, need_sse)
        verdict = self._media_verdicts.get(key, _UNJUDGED)
        if verdict is _UNJUDGED:
            verdict = _media_verdict(content_type, accept, need_json, need_sse)
            if len(self._media_verdicts) < _MAX_VERDICTS:
                self._media_verdicts[key] = verdict
        if verdict is not None:
            raise verdict[0](verdict[1])

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        try:
            if request.content.is_eof():
                # The whole body came with the head (the usual small JSON-RPC message): no timer to arm.
                return await request.read()
            async with asyncio.timeout(self.settings.body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(f"request body over {limit} bytes") from None
        except TimeoutError:
            raise BodyTimeout(f"request body not received within {self.settings.body_timeout:g}s") from None

    def _context(self, request: web.Request, stream: ClientStream, kind: str, method: str, request_id: Any,
                 params: Mapping[str, Any], raw: bytes, message: Mapping[str, Any] | None = None) -> CallContext:
        headers = request.headers
        version = headers.get("MCP-Protocol-Version")
        if version is None and params:
            meta = params.get("_meta")
            if type(meta) is dict:
                version = meta.get(PROTOCOL_VERSION_KEY)
            if version is None and method == "initialize":
                version = params.get("protocolVersion")
        return CallContext(
            method=method, request_id=request_id, params=params, raw=raw, headers=headers,
            session_id=headers.get("Mcp-Session-Id"), protocol_version=version if type(version) is str else None,
            policy=self.pipeline.policy, emit=stream.emit, start_stream=stream.start, kind=kind, message=message,
        )

    # -- handlers ----------------------------------------------------------------------------

    async def post(self, request: web.Request) -> web.StreamResponse:
        message: Any = None
        try:
            self._check(request, need_json=True, need_sse=False)
            body = await self._read_body(request)
            message = loads(body)
            if type(message) is list:
                return await self._batch(request, message)
            kind, method, request_id, params = classify(message)
        except Refused as exc:
            return _error_response(exc, request_id_of(message))
        stream = ClientStream(request)
        ctx = self._context(request, stream, kind, method, request_id, params, body, message)
        try:
            outcome = await run_chain(self.pipeline.handler, ctx)
        except ClientGone:
            return stream.response or web.Response(status=499)
        body = outcome.body()
        if stream.response is not None:
            if body is not None:
                await self._final_event(stream, body, outcome.event_id)
            return await stream.close()
        if outcome.streamed and body is not None:
            try:
                await stream.start(outcome.headers)
                await self._final_event(stream, body, outcome.event_id)
            except ClientGone:
                return stream.response or web.Response(status=499)
            return await stream.close()
        return _plain_response(outcome, body, 200 if kind == REQUEST else 202)

    @staticmethod
    async def _final_event(stream: ClientStream, body: bytes, event_id: str | None) -> None:
        try:
            await stream.emit(SseEvent(data=body, id=event_id, event="message"))
        except ClientGone:
            pass

    async def _batch(self, request: web.Request, messages: list[Any]) -> web.StreamResponse:
        """Each message of a batch runs through the chain on its own; the answers go back together."""
        if not messages:
            raise InvalidRequest("invalid request: empty batch")
        if len(messages) > self.settings.max_batch:
            raise InvalidRequest(f"invalid request: a batch of {len(messages)} messages is over the limit of "
                                 f"{self.settings.max_batch} (--max-batch); send fewer at a time")
        stream = ClientStream(request)
        answers: list[Outcome] = []
        # Stateless-era upstreams check that Mcp-Method/Mcp-Name match each message they get.
        version = request.headers.get("MCP-Protocol-Version", "")
        routed = "Mcp-Method" in request.headers or version >= _ROUTING_HEADERS_SINCE
        handler = self.pipeline.handler
        for position, message in enumerate(messages):
            if position and not position % _BATCH_SLICE:
                # Messages a stage answers itself never wait on I/O: let other clients' calls run between slices.
                await asyncio.sleep(0)
            try:
                kind, method, request_id, params = classify(message)
            except InvalidRequest as exc:
                answers.append(exc.to_outcome(request_id_of(message)))
                continue
            ctx = self._context(request, stream, kind, method, request_id, params, dumps(message), message)
            if routed:
                ctx = replace(ctx, headers=_routing_headers(request.headers, method, params))
            try:
                outcome = await run_chain(handler, ctx)
            except ClientGone:
                return stream.response or web.Response(status=499)
            if outcome.status == 401 and stream.response is None:
                # Every message of a batch carries the same credentials: one refusal answers them all, and
                # the rest are neither run nor audited.
                return _plain_response(outcome, outcome.body())
            if outcome.body() is not None and (kind == REQUEST or outcome.status >= 400):
                answers.append(outcome)
            elif kind != REQUEST and outcome.headers:
                answers.append(Outcome(status=outcome.status, headers=outcome.headers))
        bodies = [b for b in (a.body() for a in answers) if b is not None]
        if stream.response is not None:
            for answer in answers:
                body = answer.body()
                if body is not None:
                    await self._final_event(stream, body, answer.event_id)
            return await stream.close()
        headers: dict[str, str] = {}
        for answer in answers:
            headers.update(answer.headers)
        statuses = {a.status for a in answers if a.body() is not None}
        if not bodies:
            return _plain_response(Outcome(status=202, headers=headers), None, 202)
        status = statuses.pop() if len(statuses) == 1 else 200
        return _plain_response(Outcome(status=status, headers=headers), b"[" + b",".join(bodies) + b"]")

    async def get(self, request: web.Request) -> web.StreamResponse:
        try:
            self._check(request, need_json=False, need_sse=True)
        except Refused as exc:
            return _error_response(exc)
        return await self._bodiless(request, STREAM)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        if not self._origins.allows(request.headers.get("Origin")):
            return _error_response(OriginNotAllowed("origin not allowed"))
        return await self._bodiless(request, SESSION_END)

    async def _bodiless(self, request: web.Request, kind: str) -> web.StreamResponse:
        # The server stream (GET) may idle for hours: keep middleboxes from cutting it.
        stream = ClientStream(request, self.settings.sse_keepalive if kind == STREAM else None)
        ctx = self._context(request, stream, kind, "", None, {}, b"")
        try:
            outcome = await run_chain(self.pipeline.handler, ctx)
        except ClientGone:
            return stream.response or web.Response(status=499)
        finally:
            stream.stop()
        if stream.response is not None:
            return await stream.close()
        return _plain_response(outcome, outcome.body(), 200)


def add_routes(app: web.Application, endpoint: McpEndpoint, path: str = "/mcp") -> None:
    app.router.add_post(path, endpoint.post)
    app.router.add_get(path, endpoint.get, allow_head=False)
    app.router.add_delete(path, endpoint.delete)

