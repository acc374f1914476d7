"""JSON-RPC classification and the SSE parser/encoder the proxy relays streams with."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toolmesh.api.mcp_http import SseEvent, SseParser, encode_sse
from toolmesh.sidecar.chain.frame import NOTIFICATION, REQUEST, RESPONSE
from toolmesh.sidecar.chain.jsonrpc import InvalidRequest, ParseError, classify, loads, serialise_request


def test_classify_requests_notifications_and_responses():
    assert classify({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}) == (
        REQUEST, "tools/call", 1, {"name": "x"})
    kind, method, request_id, params = classify({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert (kind, method, request_id, dict(params)) == (NOTIFICATION, "notifications/initialized", None, {})
    assert classify({"jsonrpc": "2.0", "id": "s1", "result": {}})[:3] == (RESPONSE, "", "s1")
    assert classify({"jsonrpc": "2.0", "id": 2, "error": {"code": 1, "message": "no"}})[0] == RESPONSE


@pytest.mark.parametrize("message", [
    {"id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 1.5, "method": "ping"},
    {"jsonrpc": "2.0", "id": None, "method": "ping"}, {"jsonrpc": "2.0", "id": 1, "method": ""},
    {"jsonrpc": "2.0", "id": 1, "method": 3}, {"jsonrpc": "2.0", "id": 1, "method": "x", "params": [1]},
    {"jsonrpc": "2.0", "id": 1}, [], "text", None,
])
def test_classify_rejects_what_is_not_jsonrpc(message):
    with pytest.raises(InvalidRequest) as refused:
        classify(message)
    assert refused.value.code == -32600 and refused.value.status == 400


def test_loads_raises_parse_error():
    with pytest.raises(ParseError) as refused:
        loads(b'{"jsonrpc":')
    assert refused.value.code == -32700


def test_serialise_request_keeps_id_and_params():
    assert loads(serialise_request("tools/call", 7, {"name": "a"})) == {
        "jsonrpc": "2.0", "method": "tools/call", "id": 7, "params": {"name": "a"}}
    assert "id" not in loads(serialise_request("notifications/x", None, {}, notification=True))


def test_sse_parser_handles_split_chunks_crlf_comments_and_multiline_data():
    wire = b": keep-alive\r\n\r\nid: 7\r\nevent: message\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\nretry: 500\ndata: x\n\n"
    parser = SseParser()
    events = []
    for i in range(len(wire)):  # one byte at a time: every split point, including inside CRLF
        events.extend(parser.feed(wire[i:i + 1]))
    assert events == [SseEvent(data=b'{"a":\n1}', id="7", event="message"), SseEvent(data=b"x", retry=500)]


def test_sse_parser_bounds_a_runaway_event():
    parser = SseParser(max_event_bytes=100)
    with pytest.raises(ValueError):
        parser.feed(b"data: " + b"x" * 200)


@given(st.lists(st.tuples(st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b),
                          st.one_of(st.none(), st.text(alphabet="abc123-", min_size=1, max_size=8))),
                min_size=1, max_size=5),
       st.integers(min_value=1, max_value=17))
def test_sse_round_trip(events, chunk_size):
    originals = [SseEvent(data=data, id=event_id) for data, event_id in events]
    wire = b"".join(encode_sse(e) for e in originals)
    parser = SseParser()
    parsed = []
    for i in range(0, len(wire), chunk_size):
        parsed.extend(parser.feed(wire[i:i + chunk_size]))
    assert parsed == originals
