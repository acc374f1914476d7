"""The legacy HTTP+SSE adapter against a real SDK server on the SDK's SSE transport, through the `Upstream` interface."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from helpers import async_wait_until, free_port, port_open, running, wait_until
from helpers.stdio_servers import SAMPLING, UpstreamClient, collect_stream, sse_tools_server, text_of
from toolmesh.sidecar.errors import UpstreamUnavailable
from toolmesh.sidecar.transports.legacy_sse import LegacySseUpstream

pytestmark = pytest.mark.timeout(60)


class SseServer:
    """The tools server on legacy SSE, restartable on the same port."""

    def __init__(self, port: int, log_dir: Path):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/sse"
        self._log_dir = log_dir
        self._runs = 0

    def run(self):
        self._runs += 1
        return running(sse_tools_server(self.port), log_path=self._log_dir / f"sse-server-{self._runs}.log")


@pytest.fixture
def sse_server(tmp_path) -> Iterator[SseServer]:
    server = SseServer(free_port(), tmp_path)
    with server.run():
        wait_until(lambda: port_open(server.port), timeout=20, what="the SSE server to listen")
        yield server


@pytest.fixture
async def adapter(sse_server):
    upstream = LegacySseUpstream(sse_server.url, reconnect_backoff=(0.05, 0.5))
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_session_lists_and_calls_tools_over_legacy_sse(adapter):
    client = UpstreamClient(adapter)
    init = await client.initialize("2025-06-18")
    assert init["result"]["serverInfo"]["name"] == "stdio-tools"
    assert client.session_id
    listed = await client.request("tools/list")
    assert {"echo", "count", "ask_model"} <= {tool["name"] for tool in listed["result"]["tools"]}
    assert text_of(await client.call_tool("echo", {"text": "over sse"})) == "over sse"
    assert await adapter.probe()


async def test_sessions_each_get_their_own_answers(adapter):
    clients = [UpstreamClient(adapter) for _ in range(5)]
    await asyncio.gather(*(client.initialize() for client in clients))
    answers = await asyncio.gather(*(client.call_tool("echo", {"text": f"c{i}"}, request_id=1)
                                     for i, client in enumerate(clients)))
    assert [text_of(a) for a in answers] == [f"c{i}" for i in range(5)]
    assert {a["id"] for a in answers} == {1}


async def test_progress_and_sampling_reach_the_caller(adapter):
    async def model(request: dict) -> dict:
        return {"role": "assistant", "content": {"type": "text", "text": "forty-two"},
                "model": "test-model", "stopReason": "endTurn"}

    client = UpstreamClient(adapter, capabilities=SAMPLING, on_server_request=model)
    await client.initialize()
    seen: list[dict] = []
    counted = await client.request("tools/call", {"name": "count", "arguments": {"steps": 4},
                                                  "_meta": {"progressToken": 99}}, events=seen)
    assert text_of(counted) == "counted 4"
    assert [(e["params"]["progressToken"], e["params"]["progress"]) for e in seen] == [(99, n) for n in range(1, 5)]
    assert text_of(await client.call_tool("ask_model", {"question": "meaning?"})) == "forty-two"


async def test_list_changed_reaches_the_sessions_get_stream(adapter):
    client = UpstreamClient(adapter)
    await client.initialize()
    seen: list[dict] = []
    stop = asyncio.Event()
    reader = asyncio.create_task(collect_stream(await adapter.get(client.headers), seen, stop))
    await client.call_tool("grow", {"name": "fresh"})
    await async_wait_until(
        lambda: _true(any(m.get("method") == "notifications/tools/list_changed" for m in seen)),
        what="list_changed on the GET stream")
    stop.set()
    await reader


async def test_requests_without_a_session_use_the_adapters_own_connection(adapter):
    answer = await adapter.post(b'{"jsonrpc":"2.0","id":"x","method":"tools/list"}', {})
    assert answer.status == 200
    assert b'"echo"' in answer.body and b'"id":"x"' in answer.body


async def test_a_lost_stream_fails_calls_in_flight_and_the_session_carries_on(sse_server):
    upstream = LegacySseUpstream(sse_server.url, reconnect_backoff=(0.05, 0.5), reconnect_wait=20)
    await upstream.start()
    try:
        client = UpstreamClient(upstream)
        await client.initialize()
        stuck = asyncio.create_task(client.call_tool("wait_forever", {"label": "sse"}))
        connection = upstream._connections[client.session_id]
        await async_wait_until(lambda: _true(connection.mux.in_flight == 1), what="the call in flight")
        pid = int(text_of(await client.call_tool("whoami")))
        os.kill(pid, signal.SIGKILL)  # the server dies; its port closes
        with pytest.raises(UpstreamUnavailable) as failed:
            await stuck
        assert failed.value.message == "upstream stream lost"
        with sse_server.run():
            wait_until(lambda: port_open(sse_server.port), timeout=20, what="the restarted SSE server")
            # Same client session, new upstream stream: the adapter replayed initialize.
            answer = await client.call_tool("whoami")
            assert int(text_of(answer)) != pid
    finally:
        await upstream.close()


async def test_deleted_and_unknown_sessions_get_404(adapter):
    client = UpstreamClient(adapter)
    await client.initialize()
    assert (await adapter.delete(client.headers)).status == 200
    gone = await adapter.post(b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', client.headers)
    assert gone.status == 404


async def test_an_unreachable_server_fails_initialize_and_probe():
    upstream = LegacySseUpstream(f"http://127.0.0.1:{free_port()}/sse", connect_timeout=2)
    await upstream.start()
    try:
        assert not await upstream.probe()
        with pytest.raises(UpstreamUnavailable):
            await UpstreamClient(upstream).initialize()
    finally:
        await upstream.close()


async def test_sessions_left_without_a_delete_close_their_upstream_stream(sse_server):
    upstream = LegacySseUpstream(sse_server.url, session_idle_timeout=0.3)
    await upstream.start()
    try:
        left = UpstreamClient(upstream)
        await left.initialize()
        connection = upstream._connections[left.session_id]

        async def closed() -> bool:
            await UpstreamClient(upstream).initialize()
            return connection.closed and left.session_id not in upstream._connections

        await async_wait_until(closed, timeout=10, what="the idle session's stream to close")
        gone = await upstream.post(b'{"jsonrpc":"2.0","id":1,"method":"ping"}', left.headers)
        assert gone.status == 404
    finally:
        await upstream.close()


async def test_the_callers_identity_headers_reach_the_server_with_each_message(adapter):
    client = UpstreamClient(adapter)
    await client.initialize()
    headers = {**client.headers, "X-Toolmesh-Subject": "alice", "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    response = await adapter.post(b'{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"request_header",'
                                  b'"arguments":{"name":"X-Toolmesh-Subject"}}}', headers)
    assert text_of(orjson.loads(response.body)) == "alice"
    # Another caller on the same adapter does not inherit them.
    assert text_of(await client.call_tool("request_header", {"name": "X-Toolmesh-Subject"})) == ""
