"""Prompts, resources, completion and logging at the gateway: listings composed from every healthy server on demand,
asking each with the caller's token, and requests routed to the server that offers what they name."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from toolmesh.api.jsonrpc import INVALID_PARAMS, error_message, strip_envelope
from toolmesh.registry.backend import Notify, discard
from toolmesh.registry.catalogue import SEPARATOR, Catalogue
from toolmesh.registry.gateway.calls import (
    Caller,
    MethodCall,
    MethodTable,
    ToolCallFailed,
    json_response,
    private_listing,
)
from toolmesh.registry.gateway.routing import Sidecars

LISTED = {"prompts/list": "prompts", "resources/list": "resources", "resources/templates/list": "resourceTemplates"}
"""Listings composed from every healthy server on demand, and the key of their items."""


class Composed:
    """Prompts as `server__prompt` (bare names route like tools), resources and templates with their URIs untouched
    (priority wins a clash), and what names them routed to their server."""

    def __init__(self, catalogue: Catalogue, sidecars: Sidecars, *, server_info: Mapping[str, Any]) -> None:
        self.catalogue = catalogue
        self.sidecars = sidecars
        self.server_info = server_info
        self._prompt_owners: dict[str, str] = {}
        """Bare prompt name → the server that answers to it (highest priority), as last listed."""
        self._resource_owners: dict[str, str] = {}
        """Resource URI (or template) → the server that serves it (highest priority), as last listed."""

    def register(self, methods: MethodTable) -> None:
        methods.register(self.listing, *LISTED)
        methods.register(self.prompts_get, "prompts/get")
        methods.register(self.resources_read, "resources/read")
        methods.register(self.complete, "completion/complete")
        methods.register(self.set_level, "logging/setLevel")

    async def listing(self, call: MethodCall) -> web.StreamResponse:
        return json_response(await self._composed_list(call.request_id, call.method, call.caller,
                                                       stateless_era=call.stateless_era))

    async def prompts_get(self, call: MethodCall) -> web.StreamResponse:
        params = call.params
        name = params.get("name")
        if not isinstance(name, str):
            return json_response(error_message(call.request_id, INVALID_PARAMS, "prompts/get needs a prompt name"))
        server, _, bare = name.partition(SEPARATOR)
        if not bare or server not in self.catalogue.servers():
            bare = name
            if name not in self._prompt_owners:
                await self._composed_list(None, "prompts/list", call.caller, stateless_era=False)
            server = self._prompt_owners.get(name, "")
        if not server:
            return json_response(error_message(call.request_id, INVALID_PARAMS, f"unknown prompt: {name}"))
        return json_response(await self.sidecars.routed(call.request_id, server, "prompts/get",
                                                        {**params, "name": bare}, call.caller, call.stateless_era))

    async def resources_read(self, call: MethodCall) -> web.StreamResponse:
        return json_response(await self.resource_request(call))

    async def resource_request(self, call: MethodCall, relay: Notify | None = None) -> dict[str, Any]:
        """The answer to a request naming a resource by `uri`, from the server that serves it; `relay` takes the
        notifications that server sends later (a subscription's updates)."""
        method, params, caller, stateless_era = call.method, call.params, call.caller, call.stateless_era
        uri = params.get("uri")
        if not isinstance(uri, str):
            return error_message(call.request_id, INVALID_PARAMS, f"{method} needs a uri")
        forwarded = dict(params)
        if uri not in self._resource_owners:
            await self._composed_list(None, "resources/list", caller, stateless_era=False)
        owner = self._resource_owners.get(uri)
        if owner is not None:
            return await self.sidecars.routed(call.request_id, owner, method, forwarded, caller, stateless_era,
                                              relay)
        # Not a listed resource: perhaps one of a template's; the first server (by priority) that knows it answers.
        answer = error_message(call.request_id, INVALID_PARAMS, f"unknown resource: {uri}")
        for server in self._answering():
            routed = await self.sidecars.routed(call.request_id, server, method, forwarded, caller, stateless_era,
                                                relay)
            if "result" in routed:
                self._resource_owners[uri] = server
                return routed
            answer = routed
        return answer

    async def set_level(self, call: MethodCall) -> web.StreamResponse:
        """Every server logs to this caller at the level asked (each keeps the level per sidecar session)."""
        forwarded = strip_envelope(call.params)
        await asyncio.gather(*(self.sidecars.routed(None, s, "logging/setLevel", forwarded, call.caller, False)
                               for s in self._answering()), return_exceptions=True)
        return json_response({"jsonrpc": "2.0", "id": call.request_id, "result": {}})

    async def complete(self, call: MethodCall) -> web.StreamResponse:
        """Completion of a prompt's or a resource template's argument, asked of the server that offers it."""
        params, caller = call.params, call.caller
        ref = params.get("ref") if isinstance(params.get("ref"), Mapping) else {}
        forwarded = dict(params)
        server = None
        if ref.get("type") == "ref/prompt" and isinstance(ref.get("name"), str):
            prefix, _, bare = ref["name"].partition(SEPARATOR)
            if bare and prefix in self.catalogue.servers():
                server, forwarded["ref"] = prefix, {**ref, "name": bare}
            else:
                if ref["name"] not in self._prompt_owners:
                    await self._composed_list(None, "prompts/list", caller, stateless_era=False)
                server = self._prompt_owners.get(ref["name"])
        elif isinstance(ref.get("uri"), str):
            if ref["uri"] not in self._resource_owners:
                await self._composed_list(None, "resources/templates/list", caller, stateless_era=False)
            server = self._resource_owners.get(ref["uri"])
        if server is None:
            return json_response(error_message(call.request_id, INVALID_PARAMS,
                                               "unknown prompt or resource template in ref"))
        return json_response(await self.sidecars.routed(call.request_id, server, "completion/complete", forwarded,
                                                        caller, call.stateless_era))

    def _answering(self) -> list[str]:
        """Servers that can answer now, the one that wins a clash of names or URIs first."""
        return self.catalogue.by_priority(s for s in self.catalogue.servers() if self.catalogue.healthy_instances(s))

    async def _server_list(self, server: str, method: str, caller: Caller) -> list[dict[str, Any]]:
        """Every item `server` lists for this caller (all pages); nothing when it has none or refuses."""
        items: list[dict[str, Any]] = []
        cursor = None
        try:
            for _ in range(20):
                result = await self.sidecars.call_server(server, {"cursor": cursor} if cursor else {}, caller,
                                                         discard, method=method)
                items.extend(i for i in result.get(LISTED[method]) or () if isinstance(i, dict))
                cursor = result.get("nextCursor")
                if not cursor:
                    break
        except ToolCallFailed:
            pass
        return items

    async def _composed_list(self, request_id: Any, method: str, caller: Caller, *,
                             stateless_era: bool) -> dict[str, Any]:
        key = LISTED[method]
        servers = self._answering()
        listings = await asyncio.gather(*(self._server_list(s, method, caller) for s in servers))
        composed: list[dict[str, Any]] = []
        owners: dict[str, str] = {}
        for server, items in zip(servers, listings):
            for item in items:
                if key == "prompts":
                    # Named like tools; the bare name answers too, for the server that wins it.
                    owners.setdefault(str(item.get("name")), server)
                    description = item.get("description") or ""
                    item = {**item, "name": f"{server}{SEPARATOR}{item.get('name')}",
                            "description": f"[{server}] {description}".rstrip()}
                else:
                    # URIs are the resource's identity and stay as they are; on a clash, priority decides.
                    address = str(item.get("uri") or item.get("uriTemplate"))
                    if owners.setdefault(address, server) != server:
                        continue
                composed.append(item)
        (self._prompt_owners if key == "prompts" else self._resource_owners).update(owners)
        result: dict[str, Any] = {key: composed}
        if stateless_era:
            result.update(private_listing(self.server_info))
        return {"jsonrpc": "2.0", "id": request_id, "result": result}
