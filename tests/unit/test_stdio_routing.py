"""Line framing of a child's output and the multiplexer's id, token and stream routing, without a child."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.mux import Channel, request
from toolmesh.sidecar.errors import UpstreamUnavailable
from toolmesh.sidecar.transports.channel import Multiplexer
from toolmesh.sidecar.transports.stateless import is_stateless_request, stateless_rejection, with_error_status
from toolmesh.sidecar.transports.stdio import read_lines
from toolmesh.sidecar.transports.base import UpstreamResponse


LINE = st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"."))


async def next_message(events):
    """The next message on an SSE stream, past the priming event (an id to resume after, no data)."""
    while not (event := await anext(events)).data:
        pass
    return orjson.loads(event.data)


async def _framed(chunks: list[bytes], max_bytes: int) -> list[bytes]:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    lines: list[bytes] = []
    await read_lines(reader, lines.append, max_bytes, "test output")
    return lines


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(LINE, max_size=20), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
       max_bytes=st.integers(min_value=1, max_value=400))
def test_lines_survive_any_chunking_and_oversized_ones_are_dropped_whole(lines, cuts, max_bytes):
    stream = b"".join(line + b"\n" for line in lines)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:]) if b > a]
    framed = asyncio.run(_framed(chunks, max_bytes))
    assert framed == [line for line in lines if len(line) <= max_bytes]


async def test_a_last_line_without_newline_still_counts():
    assert await _framed([b'{"a":1}\n{"b"', b":2}"], 100) == [b'{"a":1}', b'{"b":2}']


async def test_colliding_client_ids_get_distinct_upstream_ids_and_come_back_as_they_were():
    channel = Channel()
    mux = Multiplexer(channel.send)
    first, second = mux.new_session({}), mux.new_session({})
    calls = [asyncio.create_task(mux.post(request(1, name="a"), first)),
             asyncio.create_task(mux.post(request(1, name="b"), second))]
    sent = [await channel.next(), await channel.next()]
    assert sent[0]["id"] != sent[1]["id"]
    for message in reversed(sent):  # answered out of order
        mux.receive(orjson.dumps({"jsonrpc": "2.0", "id": message["id"], "result": {"name": message["params"]["name"]}}))
    answers = [orjson.loads((await call).body) for call in calls]
    assert answers == [{"jsonrpc": "2.0", "id": 1, "result": {"name": "a"}},
                       {"jsonrpc": "2.0", "id": 1, "result": {"name": "b"}}]


async def test_progress_turns_the_answer_into_a_stream_under_the_clients_token():
    channel = Channel()
    mux = Multiplexer(channel.send)
    session = mux.new_session({})
    call = asyncio.create_task(mux.post(request("r", name="x", _meta={"progressToken": "mine"}), session))
    sent = await channel.next()
    token = sent["params"]["_meta"]["progressToken"]
    assert token != "mine"
    mux.receive(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                              "params": {"progressToken": token, "progress": 1}}))
    mux.receive(orjson.dumps({"jsonrpc": "2.0", "id": sent["id"], "result": {}}))
    response = await call
    assert response.body is None and response.headers["Content-Type"] == "text/event-stream"
    events = [orjson.loads(event.data) async for event in response.events if event.data]
    assert events == [{"jsonrpc": "2.0", "method": "notifications/progress",
                       "params": {"progressToken": "mine", "progress": 1}},
                      {"jsonrpc": "2.0", "id": "r", "result": {}}]


async def test_server_requests_go_to_a_session_that_can_answer_them():
    channel = Channel()
    mux = Multiplexer(channel.send)
    able, unable = mux.new_session({"capabilities": {"sampling": {}}}), mux.new_session({})
    able_call = asyncio.create_task(mux.post(request(1), able))
    unable_call = asyncio.create_task(mux.post(request(1), unable))
    await channel.next()
    await channel.next()
    mux.receive(b'{"jsonrpc":"2.0","id":"s1","method":"sampling/createMessage","params":{}}')
    stream = (await able_call).events
    asked = await next_message(stream)
    assert asked["method"] == "sampling/createMessage" and asked["id"] != "s1", "under an id of the bridge's"
    assert not unable_call.done()
    await mux.post({"jsonrpc": "2.0", "id": asked["id"], "result": {"ok": True}}, able)
    assert await channel.next() == {"jsonrpc": "2.0", "id": "s1", "result": {"ok": True}}
    unable_call.cancel()


async def test_a_server_request_nobody_can_answer_is_refused_on_the_clients_behalf():
    channel = Channel()
    mux = Multiplexer(channel.send)
    mux.new_session({})
    mux.receive(b'{"jsonrpc":"2.0","id":9,"method":"elicitation/create","params":{}}')
    refusal = await channel.next()
    assert refusal["id"] == 9 and refusal["error"]["code"] == -32601


async def test_a_client_cancellation_is_readdressed_and_ends_the_call():
    channel = Channel()
    mux = Multiplexer(channel.send)
    session = mux.new_session({})
    call = asyncio.create_task(mux.post(request(42), session))
    sent = await channel.next()
    await mux.post({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 42}}, session)
    assert (await channel.next())["params"]["requestId"] == sent["id"]
    assert (await call).status == 202
    assert mux.in_flight == 0


async def test_fail_all_ends_every_call_with_the_error():
    channel = Channel()
    mux = Multiplexer(channel.send)
    call = asyncio.create_task(mux.post(request(1), None))
    await channel.next()
    mux.fail_all(UpstreamUnavailable("upstream exited", data={"exitCode": 1}))
    with pytest.raises(UpstreamUnavailable) as failed:
        await call
    assert failed.value.data == {"exitCode": 1}


async def test_a_batch_is_answered_as_one_array(caplog):
    caplog.set_level(logging.WARNING)
    channel = Channel()
    mux = Multiplexer(channel.send)
    call = asyncio.create_task(mux.post([request(1, method="ping"), request(2, method="tools/list")], None))
    sent = [await channel.next(), await channel.next()]
    mux.receive(b"not json at all")
    mux.receive(orjson.dumps([{"jsonrpc": "2.0", "id": m["id"], "result": {}} for m in sent]))
    assert orjson.loads((await call).body) == [{"jsonrpc": "2.0", "id": 1, "result": {}},
                                               {"jsonrpc": "2.0", "id": 2, "result": {}}]
    assert "not JSON-RPC" in caplog.text


async def test_resource_updates_reach_subscribers_only_and_the_last_unsubscribe_goes_upstream():
    channel = Channel()
    mux = Multiplexer(channel.send)
    first, second, other = mux.new_session({}), mux.new_session({}), mux.new_session({})
    streams = {s.id: mux.open_stream(s) for s in (first, second, other)}
    for session in (first, second):
        call = asyncio.create_task(mux.post(request(1, method="resources/subscribe", uri="file:///a"), session))
        sent = await channel.next()
        mux.receive(orjson.dumps({"jsonrpc": "2.0", "id": sent["id"], "result": {}}))
        await call
    assert mux.subscribed_uris() == {"file:///a"}
    mux.receive(b'{"jsonrpc":"2.0","method":"notifications/resources/updated","params":{"uri":"file:///a"}}')
    for session in (first, second):
        assert (await next_message(streams[session.id].events))["params"]["uri"] == "file:///a"
    assert other.stream.empty()

    # The first unsubscribe is answered by the proxy: the second session still watches the resource.
    kept = await mux.post(request(2, method="resources/unsubscribe", uri="file:///a"), first)
    assert orjson.loads(kept.body) == {"jsonrpc": "2.0", "id": 2, "result": {}}
    assert channel.sent == []
    await mux.end_session(second)
    unsubscribed = await channel.next()
    assert unsubscribed["method"] == "resources/unsubscribe" and unsubscribed["params"] == {"uri": "file:///a"}


STATELESS_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
               "io.modelcontextprotocol/clientCapabilities": {}}


def test_the_stateless_era_is_recognised_by_header_or_envelope():
    assert is_stateless_request({"method": "tools/list"}, {"MCP-Protocol-Version": "2026-07-28"})
    assert is_stateless_request({"method": "tools/list", "params": {"_meta": STATELESS_META}}, {})
    assert is_stateless_request({"method": "server/discover"}, {})
    assert not is_stateless_request({"method": "tools/list", "params": {"_meta": {"progressToken": 1}}},
                                 {"mcp-protocol-version": "2025-11-25"})


def test_stateless_requests_are_checked_as_a_streamable_http_server_would():
    listing = {"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {"_meta": STATELESS_META}}
    headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"}
    assert stateless_rejection(listing, headers) is None
    mismatch = stateless_rejection(listing, {**headers, "Mcp-Method": "tools/call"})
    assert mismatch.status == 400 and orjson.loads(mismatch.body)["error"]["code"] == -32020
    bad_envelope = stateless_rejection({**listing, "params": {}}, headers)
    assert bad_envelope.status == 400
    removed = stateless_rejection({**listing, "method": "initialize"}, {**headers, "Mcp-Method": "initialize"})
    assert removed.status == 404 and orjson.loads(removed.body)["error"]["code"] == -32601


def test_a_stateless_error_answer_gets_its_codes_http_status():
    unknown = with_error_status(UpstreamResponse(status=200, body=b'{"jsonrpc":"2.0","id":1,"error":{"code":-32601,'
                                                                  b'"message":"Method not found"}}'))
    assert unknown.status == 404
    fine = with_error_status(UpstreamResponse(status=200, body=b'{"jsonrpc":"2.0","id":1,"result":{"error":1}}'))
    assert fine.status == 200
