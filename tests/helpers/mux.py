"""The upstream end of a `Multiplexer` in unit tests: what it sent, as parsed messages."""

from __future__ import annotations

import asyncio

import orjson


class Channel:
    """The upstream end of a multiplexer: what was sent, as parsed messages, in order."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.arrived = asyncio.Event()

    async def send(self, data: bytes) -> None:
        self.sent.append(orjson.loads(data))
        self.arrived.set()

    async def next(self) -> dict:
        while not self.sent:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)
        return self.sent.pop(0)


def request(request_id, method="tools/call", **params) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
