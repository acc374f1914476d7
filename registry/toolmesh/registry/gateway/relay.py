"""Server → caller: a server's sampling, elicitation or roots request during a call goes to that call's caller, under
an unguessable id kept in the caller's session, and the caller's answer goes back to the server.

Only the session the request was put to can answer it, and only from the
principal that opened that session (dispatch checks both before `take_answer`);
anything else is acknowledged and dropped. 2026-07-28 callers are never asked:
their servers answer `input_required` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from toolmesh.api.jsonrpc import INTERNAL_ERROR, INVALID_REQUEST
from toolmesh.api.sessions import unguessable_id
from toolmesh.registry.backend import Ask, Notify
from toolmesh.registry.gateway.sessions import GatewaySession

ASK_TIMEOUT = 600.0
"""Seconds a server's sampling or elicitation request waits for the caller's answer (a person may be typing)."""


def asker(session: GatewaySession, notify: Notify) -> Ask:
    """How a call in `session` puts its server's requests to the caller: on the call's own stream (`notify`)."""

    async def ask(server_request: Mapping[str, Any]) -> dict[str, Any]:
        # The server's request goes to the caller under an unguessable id of ours; the answer arrives as a POST in
        # this session from its principal (`take_answer`) and goes back to the server under the server's id.
        ask_id = unguessable_id("toolmesh-")
        asks = session.asks if session.asks is not None else {}
        session.asks = asks
        waiting = asks[ask_id] = asyncio.get_running_loop().create_future()
        try:
            await notify({**server_request, "id": ask_id})
            return await asyncio.wait_for(waiting, ASK_TIMEOUT)
        except asyncio.TimeoutError:
            return {"error": {"code": INTERNAL_ERROR, "message": "the caller did not answer in time"}}
        finally:
            asks.pop(ask_id, None)
            if not asks and session.asks is asks:
                session.asks = None

    return ask


def take_answer(session: GatewaySession | None, message: Mapping[str, Any]) -> None:
    """A caller's answer (a JSON-RPC response) to a request put to `session`; one nobody waits for is dropped."""
    answer_id = message.get("id")
    waiting = session.asks.get(answer_id) if session is not None and session.asks and \
        isinstance(answer_id, str) else None
    if waiting is not None and not waiting.done():
        waiting.set_result({k: message[k] for k in ("result", "error") if k in message}
                           or {"error": {"code": INVALID_REQUEST, "message": "empty answer"}})
