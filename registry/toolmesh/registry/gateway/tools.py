"""Tools at the gateway: `tools/list` from the catalogue, per caller where sidecars filter, and `tools/call` routed by
gateway name to a server's sidecar (or to a tool the registry serves itself)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from toolmesh.api.jsonrpc import INVALID_PARAMS, UPSTREAM_UNAVAILABLE, dumps, error_message
from toolmesh.registry.backend import Ask, BackendRefused, BackendUnavailable, Notify
from toolmesh.registry.catalogue import SEPARATOR, Catalogue, GatewayView, Instance
from toolmesh.registry.gateway.calls import (
    SSE_HEADERS,
    Caller,
    LocalTool,
    MethodCall,
    MethodTable,
    ToolCallFailed,
    json_response,
    private_listing,
    sse_message,
    stamped,
)
from toolmesh.registry.gateway.relay import asker
from toolmesh.registry.gateway.routing import Sidecars
from toolmesh.registry.gateway.sessions import Sessions
from toolmesh.registry.metrics import LOCAL_SERVER, UNKNOWN_SERVER, RegistryMetrics

LOG_LEVEL_KEY = "io.modelcontextprotocol/logLevel"
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


class Tools:
    """Every healthy server's tools as `server__tool`, bare names routed by priority, and the registry's own tools."""

    def __init__(self, catalogue: Catalogue, sidecars: Sidecars, sessions: Sessions, metrics: RegistryMetrics, *,
                 server_info: Mapping[str, Any], page_size: int = 1000) -> None:
        self.catalogue = catalogue
        self.sidecars = sidecars
        self.sessions = sessions
        self.metrics = metrics
        self.server_info = server_info
        self.page_size = page_size
        self.local_tools: dict[str, tuple[dict[str, Any], LocalTool]] = {}
        self._visible: dict[tuple[str, str | None, int], tuple[float, frozenset[str]]] = {}
        """(sidecar endpoint, caller's Authorization, catalogue version) → (until, tool names it lists them)."""

    def register(self, methods: MethodTable) -> None:
        methods.register(self.tools_list, "tools/list")
        methods.register(self.tools_call, "tools/call")

    def add_local_tool(self, definition: dict[str, Any], handler: LocalTool) -> None:
        self.local_tools[definition["name"]] = (definition, handler)

    # -- tools/list ----------------------------------------------------------------

    async def tools_list(self, call: MethodCall) -> web.StreamResponse:
        view = self.catalogue.view()
        cursor_in = call.params.get("cursor")
        filtered = {s: i for s in self.catalogue.servers() if (i := self.catalogue.caller_filtered(s)) is not None}
        try:
            if filtered:
                page, cursor = await self._callers_page(view, filtered, call.caller, cursor_in)
            else:
                page, cursor = view.page_json(cursor_in, self.page_size)
        except ValueError as exc:
            return json_response(error_message(call.request_id, INVALID_PARAMS, str(exc)))
        # Assembled from pre-serialised pages: 2,000 tools are not re-encoded on every listing.
        parts = [dumps(d) for d, _ in self.local_tools.values()] if not cursor_in else []
        if page:
            parts.append(page)
        extra: dict[str, Any] = {}
        if cursor:
            extra["nextCursor"] = cursor
        if call.stateless_era:
            extra.update(private_listing(self.server_info))
        tail = dumps(extra)[1:-1]
        body = b"".join([b'{"jsonrpc":"2.0","id":', dumps(call.request_id), b',"result":{"tools":[',
                         b",".join(parts), b"]", b"," + tail if tail else b"", b"}}"])
        return web.Response(body=body, content_type="application/json")

    async def _callers_page(self, view: GatewayView, filtered: Mapping[str, Instance], caller: Caller,
                            cursor: str | None) -> tuple[bytes, str | None]:
        """A page of the tools this caller may call: sidecars that authenticate are asked with the caller's token."""
        servers = sorted(filtered)
        visible = await asyncio.gather(*(self._visible_tools(filtered[s], caller) for s in servers))
        allowed = {s: names for s, names in zip(servers, visible)}
        tools = [t for t in view.tools
                 if (route := view.routes[t["name"]]).server not in allowed or route.tool in allowed[route.server]]
        start = view.offset(cursor)
        end = start + self.page_size
        return dumps(tools[start:end])[1:-1], (f"{view.version}:{end}" if end < len(tools) else None)

    async def _visible_tools(self, inst: Instance, caller: Caller) -> frozenset[str]:
        """The tool names `inst`'s sidecar lists for this caller, cached briefly; nothing when it refuses them."""
        key = (inst.endpoint, caller.authorization, self.catalogue.version)
        cached = self._visible.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        names: set[str] = set()
        try:
            cursor = None
            for _ in range(50):
                answer = await self.sidecars.backends.request(inst.endpoint, "tools/list",
                                                              {"cursor": cursor} if cursor else {},
                                                              authorization=caller.authorization)
                result = answer.get("result") or {}
                names.update(t.get("name") for t in result.get("tools") or [] if isinstance(t, dict))
                cursor = result.get("nextCursor")
                if "error" in answer or not cursor:
                    break
        except (BackendUnavailable, BackendRefused):
            names = set()
        visible = frozenset(names)
        if len(self._visible) > 10_000:
            self._visible.clear()
        self._visible[key] = (time.monotonic() + max(1.0, self.catalogue.interval), visible)
        return visible

    # -- tools/call ----------------------------------------------------------------

    async def tools_call(self, call: MethodCall) -> web.StreamResponse:
        """Answer a call as plain JSON, or as an SSE stream once the server sends anything before its result."""
        request, session, request_id, params = call.request, call.session, call.request_id, call.params
        name = params.get("name")
        if not isinstance(name, str):
            return json_response(error_message(request_id, INVALID_PARAMS, "tools/call needs a tool name"))
        stream: web.StreamResponse | None = None

        log_levels = _log_levels(params) if session is None else None

        async def notify(note: Mapping[str, Any]) -> None:
            # The first notification commits the answer to an SSE stream; a quick result stays plain JSON.
            nonlocal stream
            if log_levels is not None and note.get("method") == "notifications/message" \
                    and (note.get("params") or {}).get("level") not in log_levels:
                return  # a 2026-07-28 caller gets only the log levels its request asked for
            if stream is None:
                stream = web.StreamResponse(headers=SSE_HEADERS)
                await stream.prepare(request)
            await stream.write(sse_message(dumps(note)))

        task = asyncio.current_task()
        if session is not None and task is not None:
            session.in_flight[request_id] = task
        try:
            if session is None:
                result = stamped(await self.call_tool(name, params, call.caller, notify), self.server_info)
            else:
                result = await self.call_tool(name, params, call.caller, notify, asker(session, notify),
                                              self.sessions.relay_to(session))
            answer = {"jsonrpc": "2.0", "id": request_id, "result": result}
        except ToolCallFailed as exc:
            if exc.unauthorized and stream is None:
                raise  # answered with the sidecar's status and the gateway's challenge
            answer = error_message(request_id, exc.code, exc.message, exc.data)
        except asyncio.CancelledError:
            if session is not None and self.sessions.live(session) and request_id in session.in_flight:
                # Cancelled by notifications/cancelled: the spec says send nothing back.
                session.in_flight.pop(request_id, None)
                if stream is not None:
                    return stream
                return web.Response(status=202)
            raise
        finally:
            if session is not None:
                session.in_flight.pop(request_id, None)
                self.sessions.touch(session)
        if stream is None:
            return json_response(answer)
        await stream.write(sse_message(dumps(answer)))
        await stream.write_eof()
        return stream

    async def call_tool(self, name: str, params: Mapping[str, Any], caller: Caller, notify: Notify,
                        ask: Ask | None = None, relay: Notify | None = None) -> dict[str, Any]:
        """Route one `tools/call` by gateway name; returns the CallToolResult or raises ToolCallFailed."""
        server = UNKNOWN_SERVER
        try:
            local = self.local_tools.get(name)
            if local is not None:
                server = LOCAL_SERVER
                result = await local[1](params, caller, notify)
            else:
                view = self.catalogue.view()
                route = view.routes.get(name)
                if route is None:
                    raise ToolCallFailed(INVALID_PARAMS, f"unknown tool: {name}")
                server = route.server
                if route.tool == name and name in view.claimants and name != f"{server}{SEPARATOR}{route.tool}":
                    server = await self._bare_owner(view.claimants[name], name, caller)
                result = await self.sidecars.call_server(server, {**params, "name": route.tool}, caller, notify,
                                                         ask=ask, relay=relay)
        except ToolCallFailed as exc:
            self.metrics.call(server, "refused" if exc.unauthorized else
                              "unavailable" if exc.code == UPSTREAM_UNAVAILABLE else "error")
            raise
        except asyncio.CancelledError:
            self.metrics.call(server, "cancelled")
            raise
        self.metrics.call(server, "tool_error" if result.get("isError") else "ok")
        return result

    async def _bare_owner(self, claimants: tuple[str, ...], tool: str, caller: Caller) -> str:
        """The server a bare tool name leads to for this caller: the highest-priority one that lists it to them.

        A server whose sidecar does not filter by caller lists it to everyone; one that does is asked (with the
        caller's token, cached per catalogue version, as `tools/list` asks). When none lists it to this caller,
        the winner by priority answers, and its sidecar says why not.
        """
        for server in claimants:
            inst = self.catalogue.caller_filtered(server)
            if inst is None or tool in await self._visible_tools(inst, caller):
                return server
        return claimants[0]


def _log_levels(params: Mapping[str, Any]) -> frozenset[str]:
    """The log levels a 2026-07-28 request asked for (`logLevel` in its `_meta`): that one and above, else none."""
    meta = params.get("_meta")
    requested = meta.get(LOG_LEVEL_KEY) if isinstance(meta, Mapping) else None
    return frozenset(LOG_LEVELS[LOG_LEVELS.index(requested):]) if requested in LOG_LEVELS else frozenset()
