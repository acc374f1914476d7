"""The server-side rules both MCP servers share (toolmesh.api.mcp_http), and the gateway reading sidecars' streams
through the same bounded SSE parser as the sidecar reads its upstream's."""

from __future__ import annotations

import pytest

from toolmesh.api.mcp_http import OriginPolicy, SseEvent, encode_sse, iter_sse
from toolmesh.registry.backend import sse_data


@pytest.mark.parametrize(("allowed", "origin", "ok"), [
    ((), None, True),                                   # not a browser
    ((), "http://localhost:3000", True),                # a local page, nothing configured
    ((), "http://127.0.0.1", True),
    ((), "https://evil.example", False),                # DNS rebinding: a remote page
    ((), "not a url [", False),
    (("https://app.example",), "https://APP.example/", True),
    (("https://app.example",), "http://localhost", False),  # once origins are named, only they
    (("*",), "https://anything.example", True),
])
def test_origin_policy(allowed, origin, ok):
    assert OriginPolicy(allowed).allows(origin) is ok


async def chunks(*parts: bytes):
    for part in parts:
        yield part


async def test_events_round_trip_split_anywhere():
    events = [SseEvent(b'{"a":1}', id="1"), SseEvent(b"line1\nline2", event="message", retry=5)]
    wire = b"".join(encode_sse(e) for e in events)
    for cut in range(1, len(wire)):
        got = [e async for e in iter_sse(chunks(wire[:cut], wire[cut:]))]
        assert got == events, cut


async def test_the_gateway_cuts_a_sidecar_event_beyond_the_bound_instead_of_buffering_it():
    huge = b"data: " + b"x" * 5000
    stream = chunks(b'data: {"ok":1}\n\n', huge, huge, b"\n\n", b'data: {"late":1}\n\n')
    got = [d async for d in sse_data(stream, max_event_bytes=4096)]
    assert got == [b'{"ok":1}']  # cut at the oversize event: nothing of it, nothing after it
