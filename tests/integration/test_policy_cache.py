"""The result cache through the real sidecar: SDK clients with real JWTs, an SDK server behind a counting relay."""

from __future__ import annotations

import asyncio
import json
import time

import httpx2
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import TextContent

from helpers import ROOT, async_wait_until
from helpers.fault_upstream import Fault
from helpers.stateless_calls import STATELESS_ERA
from helpers.sidecar import guarded_sidecar, http_get, sidecar
from helpers.tokens import TokenIssuer


@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer("cache-tests")


@pytest.fixture(scope="module")
def proxied(relay, issuer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    # The cache example as shipped, plus token auth so that callers have distinct subjects.
    policy = yaml.safe_load((ROOT / "examples/policies/cache.yaml").read_text())
    policy["spec"]["auth"] = issuer.hmac_auth()
    with guarded_sidecar(["--upstream", relay.url], tmp, policy) as sc:
        yield sc


def client(url: str, token: str, mode: str = "legacy") -> Client:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    return Client(streamable_http_client(url, http_client=http), mode=mode)


def text_of(result) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA])
async def test_repeated_read_only_call_is_answered_without_reaching_upstream(proxied, relay, issuer, mode):
    async with client(proxied.url, issuer.token("alice", alg="HS256"), mode) as session:
        await session.list_tools()
        before = relay.count("lookup")
        first = await session.call_tool("lookup", {"q": f"hit-{mode}"})
        second = await session.call_tool("lookup", {"q": f"hit-{mode}"})
        assert text_of(first) == text_of(second) == f"result for hit-{mode}"
        assert relay.count("lookup") == before + 1
        await session.call_tool("lookup", {"q": f"other-{mode}"})
        assert relay.count("lookup") == before + 2
    status, metrics = http_get(f"{proxied.base}/metrics")
    assert status == 200
    assert b'toolmesh_cache_lookups_total{tool="lookup",result="hit"}' in metrics


async def test_destructive_tools_and_tool_errors_are_never_cached(proxied, relay, issuer):
    async with client(proxied.url, issuer.token("alice", alg="HS256")) as session:
        await session.list_tools()
        for tool, args in (("delete_item", {"item": "x"}), ("purge", {"q": "x"}), ("broken", {"q": "x"})):
            before = relay.count(tool)
            first = await session.call_tool(tool, args)
            second = await session.call_tool(tool, args)
            assert relay.count(tool) == before + 2, tool
            assert first.is_error == second.is_error == (tool == "broken")


async def test_a_second_subject_never_gets_the_first_ones_cached_result(proxied, relay, issuer):
    async with client(proxied.url, issuer.token("alice", alg="HS256")) as alice, \
            client(proxied.url, issuer.token("bob", alg="HS256")) as bob:
        await alice.list_tools()
        before = relay.count("whoami")
        assert text_of(await alice.call_tool("whoami", {"q": "same"})) == "subject=alice q=same"
        assert text_of(await bob.call_tool("whoami", {"q": "same"})) == "subject=bob q=same"
        assert relay.count("whoami") == before + 2
        assert text_of(await alice.call_tool("whoami", {"q": "same"})) == "subject=alice q=same"
        assert text_of(await bob.call_tool("whoami", {"q": "same"})) == "subject=bob q=same"
        assert relay.count("whoami") == before + 2


async def test_identical_concurrent_calls_reach_upstream_once(proxied, relay, issuer):
    async with client(proxied.url, issuer.token("alice", alg="HS256")) as session:
        await session.list_tools()
        before = relay.count("stall")
        results = await asyncio.wait_for(
            asyncio.gather(*(session.call_tool("stall", {"seconds": 0.5}) for _ in range(6))), 20)
        assert {text_of(r) for r in results} == {"stalled 0.5"}
        assert relay.count("stall") == before + 1


async def test_result_ttl_ms_and_public_cache_scope_are_honoured(proxied, relay, issuer):
    async with client(proxied.url, issuer.token("alice", alg="HS256")) as alice, \
            client(proxied.url, issuer.token("bob", alg="HS256")) as bob:
        await alice.list_tools()
        # ttlMs 0: the server says the result is stale at once.
        relay.inject("lookup", Fault("hint", hints={"ttlMs": 0}))
        before = relay.count("lookup")
        await alice.call_tool("lookup", {"q": "ttl-zero"})
        await alice.call_tool("lookup", {"q": "ttl-zero"})
        assert relay.count("lookup") == before + 2

        # ttlMs 400 and public: shared with bob, and gone after 0.4 s.
        relay.inject("lookup", Fault("hint", hints={"ttlMs": 400, "cacheScope": "public"}))
        before = relay.count("lookup")
        stored_at = time.monotonic()
        await alice.call_tool("lookup", {"q": "ttl-public"})
        assert text_of(await bob.call_tool("lookup", {"q": "ttl-public"})) == "result for ttl-public"
        assert relay.count("lookup") == before + 1

        async def refetched():
            await alice.call_tool("lookup", {"q": "ttl-public"})
            return relay.count("lookup") == before + 2

        await async_wait_until(refetched, timeout=10, interval=0.05, what="the entry to expire")
        assert time.monotonic() - stored_at >= 0.4


async def test_results_are_not_shared_between_protocol_revisions(proxied, relay, issuer):
    token = issuer.token("alice", alg="HS256")
    async with client(proxied.url, token, "legacy") as legacy, client(proxied.url, token, STATELESS_ERA) as modern:
        await legacy.list_tools()
        before = relay.count("lookup")
        assert text_of(await legacy.call_tool("lookup", {"q": "eras"})) == "result for eras"
        # The 2026-07-28 client validates fields an older revision's result lacks: it gets its own.
        assert text_of(await modern.call_tool("lookup", {"q": "eras"})) == "result for eras"
        assert text_of(await modern.call_tool("lookup", {"q": "eras"})) == "result for eras"
        assert relay.count("lookup") == before + 2


async def test_annotations_are_fetched_by_the_sidecar_when_no_client_listed_tools(relay, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"cache": {"ttlSeconds": 300}}))

    async def call(http, url):
        # Plain 2026-07-28 requests: no initialize, no tools/list that would fill the catalogue.
        message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                   "params": {"name": "lookup", "arguments": {"q": "unlisted"},
                              "_meta": {"io.modelcontextprotocol/protocolVersion": STATELESS_ERA,
                                        "io.modelcontextprotocol/clientCapabilities": {},
                                        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"}}}}
        resp = await http.post(url, content=json.dumps(message), headers={
            "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": STATELESS_ERA, "Mcp-Method": "tools/call", "Mcp-Name": "lookup"})
        assert resp.status_code == 200, resp.text
        assert "result for unlisted" in resp.text

    with sidecar(["--upstream", relay.url], tmp_path, "--policy", str(policy)) as fresh:
        async with httpx2.AsyncClient(timeout=10) as http:
            before = relay.count("lookup")
            await call(http, fresh.url)  # the tool is not known yet: not cached, but a listing starts

            async def listed():
                status, body = http_get(f"{fresh.base}/readyz")
                return json.loads(body).get("tools", 0) > 0

            await async_wait_until(listed, timeout=10, what="the sidecar to list the upstream's tools")
            await call(http, fresh.url)
            await call(http, fresh.url)
            assert relay.count("lookup") == before + 2
