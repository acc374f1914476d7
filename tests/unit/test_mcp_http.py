"""The server-side rules both MCP servers share (toolmesh.api.mcp_http), and the gateway reading sidecars' streams
through the same bounded SSE parser as the sidecar reads its upstream's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from toolmesh.api.mcp_http import (
    SESSION_ERA_VERSIONS,
    STATELESS_ERA_VERSIONS,
    OriginPolicy,
    SseEvent,
    encode_sse,
    iter_sse,
    stateless_refusal,
)
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


STATELESS = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


def call(method: str = "tools/call", **params) -> dict:
    return {"jsonrpc": "2.0", "id": 7, "method": method, "params": {"_meta": STATELESS, **params}}


def test_a_removed_method_is_a_404_method_not_found_only_where_that_side_removes_it():
    refused = stateless_refusal(call("ping"), {}, removed={"initialize", "ping"})
    assert (refused.code, refused.status, refused.data) == (-32601, 404, "ping")
    assert refused.error(7) == {"jsonrpc": "2.0", "id": 7, "error": {"code": -32601, "message": "Method not found",
                                                                       "data": "ping"}}
    headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "ping"}
    assert stateless_refusal(call("ping"), headers, removed={"initialize"}) is None  # the sidecar's upstream answers


def test_a_duplicated_routing_header_is_a_400_header_mismatch():
    class Twice(dict):
        def items(self):
            return [("Mcp-Method", "tools/call"), ("mcp-method", "tools/call")]

    refused = stateless_refusal(call(name="x", arguments={}), Twice(), removed=())
    assert refused is not None and refused.status == 400 and "more than once" in refused.message


def test_a_routing_header_that_disagrees_with_the_body_is_refused_and_one_that_agrees_is_not():
    agreeing = {"Mcp-Method": "tools/call", "Mcp-Name": "x", "MCP-Protocol-Version": "2026-07-28"}
    assert stateless_refusal(call(name="x", arguments={}), agreeing, removed=()) is None
    refused = stateless_refusal(call(name="x", arguments={}), {**agreeing, "Mcp-Name": "y"}, removed=())
    assert refused is not None and refused.status == 400


def test_the_era_constants_do_not_overlap():
    assert SESSION_ERA_VERSIONS[0] == "2025-11-25" and "2026-07-28" in STATELESS_ERA_VERSIONS
    assert not set(SESSION_ERA_VERSIONS) & set(STATELESS_ERA_VERSIONS)


def test_the_era_constants_are_the_sdks_and_cost_a_sidecar_nothing_to_import():
    from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

    assert STATELESS_ERA_VERSIONS == tuple(MODERN_PROTOCOL_VERSIONS)
    assert set(SESSION_ERA_VERSIONS) <= set(HANDSHAKE_PROTOCOL_VERSIONS)
    # The written-out constants exist so that a pass-through sidecar never loads the SDK (38 MB) to start.
    probe = ("import sys, toolmesh.sidecar.command, toolmesh.sidecar.front.app, toolmesh.sidecar.transports.http; "
             "print(sorted(m for m in sys.modules if m == 'mcp' or m.startswith(('mcp.', 'mcp_types'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_the_header_rules_are_the_sdks_and_cost_the_registry_nothing_to_import():
    from mcp.shared import inbound

    from toolmesh.api.mcp_http import ERROR_CODE_HTTP_STATUS, NAME_BEARING_METHODS, encode_header_value

    assert dict(ERROR_CODE_HTTP_STATUS) == dict(inbound.ERROR_CODE_HTTP_STATUS)
    assert dict(NAME_BEARING_METHODS) == dict(inbound.NAME_BEARING_METHODS)
    for value in ("get_weather", " edge ", "naïve", "tab\there", "=?base64?eA==?=", "", "x" * 300, "日本"):
        assert encode_header_value(value) == inbound.encode_header_value(value), value
    # The gateway serves session-era callers without the SDK in memory (it costs the registry ~45 MB idle).
    probe = ("import sys, toolmesh.registry.app, toolmesh.registry.gateway.endpoint, toolmesh.registry.backend; "
             "print(sorted(m for m in sys.modules if m == 'mcp' or m.startswith(('mcp.', 'mcp_types'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
