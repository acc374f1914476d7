"""What callers hear without asking: `list_changed` fanned out to every session's GET stream and every
`subscriptions/listen` stream, and resource subscriptions, whose updates reach the subscriber's GET stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from toolmesh.api.jsonrpc import SUBSCRIPTION_ID_KEY, dumps
from toolmesh.registry.catalogue import Catalogue
from toolmesh.registry.gateway.calls import SSE_HEADERS, MethodCall, MethodTable, json_response, sse_message
from toolmesh.registry.gateway.composed import Composed
from toolmesh.registry.gateway.sessions import GatewaySession, Sessions

LISTEN_QUEUE_SIZE = 64
LIST_CHANGED = dumps({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})


class Subscriptions:
    """Session GET streams, `subscriptions/listen` streams and resource subscriptions."""

    def __init__(self, catalogue: Catalogue, sessions: Sessions, composed: Composed) -> None:
        self.sessions = sessions
        self.composed = composed
        self.listeners: set[asyncio.Queue[bytes]] = set()
        """The queues of open `subscriptions/listen` streams (2026-07-28 callers)."""
        catalogue.on_change(self.announce_change)

    def register(self, methods: MethodTable) -> None:
        methods.register(self.resource_subscription, "resources/subscribe", "resources/unsubscribe")
        methods.register(self.listen, "subscriptions/listen")

    def close(self) -> None:
        """End every listen stream (the registry is stopping)."""
        listeners = list(self.listeners)
        self.listeners.clear()
        for queue in listeners:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(b"")

    async def resource_subscription(self, call: MethodCall) -> web.StreamResponse:
        """Routed like `resources/read`; a session's subscription sends the server's updates to its GET stream."""
        session = call.session
        relay = self.sessions.relay_to(session) if session is not None and call.method == "resources/subscribe" \
            else None
        return json_response(await self.composed.resource_request(call, relay))

    async def session_stream(self, request: web.Request, session: GatewaySession) -> web.StreamResponse:
        """A session's GET stream: list changes, and what servers send outside any call, until the session ends."""
        response = web.StreamResponse(headers={**SSE_HEADERS, "Mcp-Session-Id": session.id})
        outbox = session.outbox_queue()
        if session.list_changed:
            session.list_changed = False
            _offer(outbox, LIST_CHANGED)
        session.streams += 1  # busy from before the client sees the stream open
        try:
            await response.prepare(request)
            while True:
                data = await outbox.get()
                if not self.sessions.live(session):
                    break
                await response.write(sse_message(data))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            session.streams -= 1
            self.sessions.touch(session)
        return response

    async def listen(self, call: MethodCall) -> web.StreamResponse:
        """`subscriptions/listen`: the 2026-07-28 notification stream; only `toolsListChanged` is honoured."""
        wanted: Mapping[str, Any] = call.params.get("notifications") or {}
        honoured = {"toolsListChanged": True} if wanted.get("toolsListChanged") else {}
        meta = {SUBSCRIPTION_ID_KEY: call.request_id}
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=LISTEN_QUEUE_SIZE)
        stream = web.StreamResponse(headers=SSE_HEADERS)
        await stream.prepare(call.request)
        ack = {"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
               "params": {"notifications": honoured, "_meta": meta}}
        await stream.write(sse_message(dumps(ack)))
        if not honoured:
            return stream
        changed = dumps({"jsonrpc": "2.0", "method": "notifications/tools/list_changed", "params": {"_meta": meta}})
        self.listeners.add(queue)
        try:
            while True:
                await queue.get()
                if queue not in self.listeners:
                    break
                await stream.write(sse_message(changed))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.listeners.discard(queue)
        return stream

    def announce_change(self) -> None:
        """The healthy tool set changed: tell every session (once its GET stream exists) and every listener."""
        for session in self.sessions:
            if session.outbox is None:
                session.list_changed = True
            else:
                _offer(session.outbox, LIST_CHANGED)
        for queue in self.listeners:
            _offer(queue, b"")


def _offer(queue: asyncio.Queue[bytes], item: bytes) -> None:
    # list_changed is a level trigger: one pending copy is as good as many.
    if queue.empty():
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(item)
