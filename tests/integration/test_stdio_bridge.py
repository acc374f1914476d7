"""The stdio bridge through the `Upstream` interface: many sessions on one child, ids, progress, sampling, cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from helpers import async_wait_until
from helpers.stdio_servers import (
    SAMPLING,
    STDIO_TOOLS,
    TIME_SERVER,
    UpstreamClient,
    collect_stream,
    text_of,
)
from toolmesh.sidecar.transports.stdio import StdioUpstream

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def bridge():
    upstream = StdioUpstream(STDIO_TOOLS, start_timeout=20)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


async def test_time_server_answers_through_the_bridge():
    upstream = StdioUpstream(TIME_SERVER)
    await upstream.start()
    try:
        client = UpstreamClient(upstream)
        init = await client.initialize()
        assert init["result"]["serverInfo"]["name"] == "mcp-time"
        listed = await client.request("tools/list")
        assert "get_current_time" in {tool["name"] for tool in listed["result"]["tools"]}
        answer = await client.call_tool("get_current_time", {"timezone": "Europe/Paris"})
        assert '"timezone": "Europe/Paris"' in text_of(answer)
        assert await upstream.probe()
    finally:
        await upstream.close()


async def test_sessions_share_one_child_and_their_colliding_ids_never_mix(bridge):
    clients = [UpstreamClient(bridge) for _ in range(12)]
    await asyncio.gather(*(client.initialize() for client in clients))
    assert len({client.session_id for client in clients}) == 12

    async def calls(index: int, client: UpstreamClient) -> list[tuple[object, str]]:
        # Every session uses the same ids 1..5, all in flight at once.
        answers = await asyncio.gather(*(client.call_tool("echo", {"text": f"s{index}-r{n}"}, request_id=n)
                                         for n in range(1, 6)))
        return [(answer["id"], text_of(answer)) for answer in answers]

    results = await asyncio.gather(*(calls(i, c) for i, c in enumerate(clients)))
    for index, answers in enumerate(results):
        assert answers == [(n, f"s{index}-r{n}") for n in range(1, 6)]
    pids = await asyncio.gather(*(client.call_tool("whoami") for client in clients))
    assert len({text_of(pid) for pid in pids}) == 1  # one child serves them all


async def test_each_session_gets_its_own_progress_under_its_own_token(bridge):
    first, second = UpstreamClient(bridge), UpstreamClient(bridge)
    await first.initialize()
    await second.initialize()
    seen_first: list[dict] = []
    seen_second: list[dict] = []
    answers = await asyncio.gather(
        first.request("tools/call", {"name": "count", "arguments": {"steps": 3},
                                     "_meta": {"progressToken": "tok"}}, request_id=7, events=seen_first),
        second.request("tools/call", {"name": "count", "arguments": {"steps": 5},
                                      "_meta": {"progressToken": "tok"}}, request_id=7, events=seen_second),
    )
    assert [text_of(a) for a in answers] == ["counted 3", "counted 5"]
    assert [a["id"] for a in answers] == [7, 7]
    for seen, steps in ((seen_first, 3), (seen_second, 5)):
        assert [e["params"]["progress"] for e in seen] == list(range(1, steps + 1))
        assert {e["params"]["progressToken"] for e in seen} == {"tok"}
        assert {e["params"]["total"] for e in seen} == {steps}


async def test_sampling_goes_to_the_calling_session_and_its_answer_back_to_the_child(bridge):
    asked: list[dict] = []

    async def model(request: dict) -> dict:
        asked.append(request)
        question = request["params"]["messages"][0]["content"]["text"]
        return {"role": "assistant", "content": {"type": "text", "text": f"answer to {question}"},
                "model": "test-model", "stopReason": "endTurn"}

    caller = UpstreamClient(bridge, capabilities=SAMPLING, on_server_request=model)
    bystander = UpstreamClient(bridge, capabilities=SAMPLING)
    await caller.initialize()
    await bystander.initialize()
    stream = await bridge.get(bystander.headers)
    stop = asyncio.Event()
    bystander_saw: list[dict] = []
    reader = asyncio.create_task(collect_stream(stream, bystander_saw, stop))

    answer = await caller.call_tool("ask_model", {"question": "why?"})
    assert text_of(answer) == "answer to why?"
    assert [r["method"] for r in asked] == ["sampling/createMessage"]
    stop.set()
    await reader
    assert bystander_saw == []


async def test_a_client_without_sampling_gets_an_error_instead_of_a_request(bridge):
    client = UpstreamClient(bridge)  # declares no sampling capability
    await client.initialize()
    answer = await client.call_tool("ask_model", {"question": "why?"})
    # The tool's failure reaches the client in one form or the other, and names what was missing.
    failure = text_of(answer) if "result" in answer else answer["error"]["message"]
    assert "sampling" in failure, answer


async def test_notifications_without_a_request_reach_every_sessions_stream(bridge):
    clients = [UpstreamClient(bridge) for _ in range(3)]
    streams = []
    stop = asyncio.Event()
    for client in clients:
        await client.initialize()
        seen: list[dict] = []
        streams.append((seen, asyncio.create_task(collect_stream(await bridge.get(client.headers), seen, stop))))
    assert text_of(await clients[0].call_tool("grow", {"name": "extra"})) == "added extra"

    async def everyone_heard() -> bool:
        return all(any(m.get("method") == "notifications/tools/list_changed" for m in seen) for seen, _ in streams)

    await async_wait_until(everyone_heard, timeout=10, what="list_changed on every GET stream")
    stop.set()
    await asyncio.gather(*(task for _, task in streams))
    listed = await clients[2].request("tools/list")
    assert "extra" in {tool["name"] for tool in listed["result"]["tools"]}


async def test_child_stderr_goes_to_the_sidecar_log_line_by_line(bridge, caplog):
    caplog.set_level(logging.INFO, logger="toolmesh.sidecar.stdio")
    client = UpstreamClient(bridge)
    await client.initialize()
    await client.call_tool("shout", {"text": "first line\nsecond line"})

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "toolmesh.sidecar.stdio"]

    await async_wait_until(lambda: _true("second line" in logged()), what="stderr lines in the log")
    assert "first line" in logged()


async def test_a_client_that_goes_away_cancels_its_call_in_the_child(bridge, caplog):
    caplog.set_level(logging.INFO, logger="toolmesh.sidecar.stdio")
    client = UpstreamClient(bridge)
    await client.initialize()
    call = asyncio.create_task(client.call_tool("wait_forever", {"label": "gone"}))
    await async_wait_until(lambda: _true(bridge.mux.in_flight == 1), what="the call in flight")
    call.cancel()
    await async_wait_until(lambda: _true("cancelled gone" in caplog.text), what="the child to see the cancellation")
    assert bridge.mux.in_flight == 0


async def test_notifications_cancelled_names_the_clients_own_id(bridge, caplog):
    caplog.set_level(logging.INFO, logger="toolmesh.sidecar.stdio")
    client, other = UpstreamClient(bridge), UpstreamClient(bridge)
    await client.initialize()
    await other.initialize()
    mine = asyncio.create_task(client.call_tool("wait_forever", {"label": "mine"}, request_id=5))
    theirs = asyncio.create_task(other.call_tool("wait_forever", {"label": "theirs"}, request_id=5))
    await async_wait_until(lambda: _true(bridge.mux.in_flight == 2), what="both calls in flight")
    assert await client.notify("notifications/cancelled", {"requestId": 5, "reason": "changed my mind"}) == 202
    await async_wait_until(lambda: _true("cancelled mine" in caplog.text), what="the child to cancel the call")
    assert await mine == {}  # answered 202 with no response: the client itself withdrew it
    assert "cancelled theirs" not in caplog.text and not theirs.done()
    theirs.cancel()
    with pytest.raises(asyncio.CancelledError):
        await theirs


async def test_unknown_and_deleted_sessions_get_404(bridge):
    client = UpstreamClient(bridge)
    await client.initialize()
    assert text_of(await client.call_tool("echo", {"text": "x"})) == "x"
    assert (await bridge.delete(client.headers)).status == 200
    gone = await bridge.post(b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', client.headers)
    assert gone.status == 404
    assert (await bridge.get(client.headers)).status == 404


async def test_malformed_json_gets_a_parse_error(bridge):
    answer = await bridge.post(b"{not json", {})
    assert answer.status == 400
    assert b"-32700" in answer.body


async def _true(value: bool) -> bool:
    return value


async def test_sessions_left_without_a_delete_are_forgotten_after_their_idle_time():
    upstream = StdioUpstream(STDIO_TOOLS, session_idle_timeout=0.3)
    await upstream.start()
    try:
        left, listening = UpstreamClient(upstream), UpstreamClient(upstream)
        await left.initialize()
        await listening.initialize()
        stream = await upstream.get(listening.headers)  # an open stream keeps its session alive

        async def forgotten() -> bool:
            await UpstreamClient(upstream).initialize()  # new sessions sweep the idle ones
            return left.session_id not in upstream.mux.sessions

        await async_wait_until(forgotten, timeout=10, what="the idle session to be forgotten")
        answer = await upstream.post(b'{"jsonrpc":"2.0","id":1,"method":"ping"}', left.headers)
        assert answer.status == 404
        assert (await listening.request("ping"))["result"] == {}
        await stream.release()
    finally:
        await upstream.close()
