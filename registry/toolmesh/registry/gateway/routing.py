"""Asking a server behind the gateway: a healthy instance's sidecar, with the caller's credentials, failing over once."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from toolmesh.api.jsonrpc import INTERNAL_ERROR, UPSTREAM_UNAVAILABLE, error_message, has_envelope, strip_envelope
from toolmesh.registry.backend import Ask, BackendPool, BackendRefused, BackendUnavailable, Notify, discard
from toolmesh.registry.catalogue import Catalogue, Instance
from toolmesh.registry.gateway.calls import Caller, ToolCallFailed, stamped
from toolmesh.registry.protected_resource import challenge_params

log = logging.getLogger("toolmesh.registry")

CACHEABLE = frozenset({"resources/read", "prompts/get"})
"""Results a 2026-07-28 caller may cache, so they carry cache hints."""


class Sidecars:
    """The sidecars of the catalogue's servers, asked on a caller's behalf: the sidecar's policy decides, never the
    gateway."""

    def __init__(self, catalogue: Catalogue, backends: BackendPool, server_info: Mapping[str, Any]) -> None:
        self.catalogue = catalogue
        self.backends = backends
        self.server_info = server_info

    async def call_server(self, server: str, params: Mapping[str, Any], caller: Caller, notify: Notify,
                          instance: Instance | None = None, *, ask: Ask | None = None,
                          method: str = "tools/call", relay: Notify | None = None) -> dict[str, Any]:
        """Send `method` (`tools/call` unless said) to a healthy instance of `server` (a given one, or the least
        busy), failing over once.

        A request in the 2026-07-28 envelope goes to the sidecar as it is, so
        the server sees the caller's capabilities and may answer
        `input_required`; to a sidecar whose server speaks only the session
        era it goes, without the envelope, through a session as every other
        request does.
        """
        stateless = has_envelope(params)
        tried: list[str] = []
        unreachable: BackendUnavailable | None = None
        while True:
            inst = instance if not tried else None
            if instance is None and len(tried) < 2:  # fail over once
                inst = self.catalogue.pick(server, exclude=tried)
            if inst is None:
                if unreachable is not None:
                    raise ToolCallFailed(UPSTREAM_UNAVAILABLE, f"server {server} is unavailable: {unreachable}")
                raise ToolCallFailed(UPSTREAM_UNAVAILABLE, f"server {server} is unavailable: no live instance "
                                                           "(none within its heartbeat deadline)")
            tried.append(inst.instance)
            inst.in_flight += 1
            try:
                response = None
                if stateless and self.backends.speaks_stateless(inst.endpoint):
                    response = await self.backends.request_stateless(
                        inst.endpoint, method, params, authorization=caller.authorization,
                        budget_key=caller.budget_key, headers=dict(caller.param_headers), notify=notify)
                if response is None:
                    response = await self.backends.request(inst.endpoint, method,
                                                           strip_envelope(params) if stateless else params,
                                                           authorization=caller.authorization,
                                                           budget_key=caller.budget_key, notify=notify, ask=ask,
                                                           relay=relay)
            except BackendUnavailable as exc:
                # The sidecar itself cannot be reached: the only failure that is the instance's, not the call's.
                # Another instance gets the call; this one is tried last until it beats again, and its tools stay
                # listed until its heartbeat deadline says otherwise.
                log.warning("instance %s of %s unreachable: %s", inst.instance, server, exc)
                self.catalogue.mark_unreachable(inst, str(exc))
                self.backends.forget_endpoint(inst.endpoint)
                unreachable = exc
                continue
            except BackendRefused as exc:
                raise _refusal(server, exc) from exc
            finally:
                inst.in_flight -= 1
            if inst.unreachable is not None:
                self.catalogue.mark_unreachable(inst, None)
            if "error" in response:
                error = response["error"]
                raise ToolCallFailed(error.get("code", INTERNAL_ERROR), error.get("message", ""), error.get("data"))
            return response.get("result") or {}

    async def routed(self, request_id: Any, server: str, method: str, params: Mapping[str, Any], caller: Caller,
                     stateless_era: bool, relay: Notify | None = None) -> dict[str, Any]:
        """The JSON-RPC answer to a request routed to `server`: its result (stamped for a 2026-07-28 caller) or its
        error. Only a sidecar's 401/403 is raised, to be answered with that status and the gateway's challenge."""
        try:
            result = await self.call_server(server, params, caller, discard, method=method, relay=relay)
        except ToolCallFailed as exc:
            if exc.unauthorized:
                raise
            return error_message(request_id, exc.code, exc.message, exc.data)
        if stateless_era and result.get("resultType", "complete") == "complete":
            result = stamped(result, self.server_info)
            if method in CACHEABLE:
                # Routed per caller to servers that may change at any heartbeat: unless the server itself gave hints
                # (a stateless answer), never shared, not kept.
                result = {"ttlMs": 0, "cacheScope": "private", **result}
        return {"jsonrpc": "2.0", "id": request_id, "result": result}


def _refusal(server: str, exc: BackendRefused) -> ToolCallFailed:
    """What the caller is told when a sidecar answered a call with an error and no result."""
    error = (exc.message or {}).get("error") or {}
    code = error.get("code", UPSTREAM_UNAVAILABLE if exc.status >= 500 else INTERNAL_ERROR)
    message = str(error.get("message") or exc)
    if exc.status >= 500:
        # No JSON-RPC answer, an HTTP error relayed from the upstream (503 overloaded...): this call's failure.
        message = f"server {server} is unavailable: {message}"
    if exc.status in (401, 403):
        return ToolCallFailed(code, message, error.get("data"), status=exc.status,
                              challenge=challenge_params(exc.headers.get("www-authenticate")))
    return ToolCallFailed(code, message, error.get("data"))
