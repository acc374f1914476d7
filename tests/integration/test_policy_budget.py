"""Context budgets through the real sidecar: truncation with a readable link, paging, isolation, exhaustion."""

from __future__ import annotations

import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import ResourceLink, TextContent

from helpers import ROOT
from helpers.stateless_calls import STATELESS_ERA
from helpers.sidecar import guarded_sidecar, http_get
from helpers.tokens import TokenIssuer

META = "io.toolmesh/budget"


def words(count: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(count))


@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer("budget-tests")


@pytest.fixture(scope="module")
def proxied(relay, issuer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budget")
    # The budget example with a small window (so a few calls fill it), plus token auth for distinct subjects.
    policy = yaml.safe_load((ROOT / "examples/policies/budget.yaml").read_text())
    policy["spec"]["budget"].update(totalTokens=20000, reservedForResponse=1000, reservedForSystem=1000)
    assert policy["spec"]["budget"]["resultFraction"] == 0.3 and policy["spec"]["budget"]["minAvailable"] == 500
    policy["spec"]["auth"] = issuer.hmac_auth()
    with guarded_sidecar(["--upstream", relay.url], tmp, policy) as sc:
        yield sc


def client(url: str, token: str, mode: str = "legacy", **headers: str) -> Client:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}", **headers})
    return Client(streamable_http_client(url, http_client=http), mode=mode)


def text_of(result) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


def link_of(result) -> str:
    links = [c for c in result.content if isinstance(c, ResourceLink)]
    assert len(links) == 1, result.content
    return str(links[0].uri)


async def read_all_pages(session: Client, uri: str) -> list[str]:
    pages: list[str] = []
    while uri:
        contents = (await session.read_resource(uri)).contents
        assert len(contents) == 1
        pages.append(contents[0].text)
        uri = (contents[0].meta or {}).get("io.toolmesh/page", {}).get("next")
        assert len(pages) <= 20, "paging does not end"
    return pages


@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA])
async def test_large_result_is_truncated_and_readable_in_full_by_pages(proxied, issuer, mode):
    headers = {"Mcp-Budget-Key": f"truncation-{mode}"} if mode == STATELESS_ERA else {}
    async with client(proxied.url, issuer.token("alice", alg="HS256"), mode, **headers) as session:
        small = await session.call_tool("words", {"count": 10})
        assert text_of(small) == words(10)
        assert small.meta[META]["used"] == 20 and small.meta[META]["truncated"] is False

        result = await session.call_tool("words", {"count": 3000})
        text = text_of(result)
        kept = int((18000 - 20) * 0.3)
        assert f"[TRUNCATED: 8000 tokens → {kept} tokens." in text
        assert words(3000).startswith(text.split("\n\n[TRUNCATED")[0])
        assert result.meta[META]["truncated"] is True
        assert result.meta[META]["available"] == 18000 - 20 - kept
        uri = link_of(result)
        assert uri.startswith("toolmesh://results/")

        pages = await read_all_pages(session, uri)
        assert len(pages) == 4
        assert "".join(pages) == words(3000)


async def test_another_subject_cannot_read_the_full_result(proxied, issuer):
    async with client(proxied.url, issuer.token("alice", alg="HS256")) as alice, \
            client(proxied.url, issuer.token("mallory", alg="HS256")) as mallory:
        uri = link_of(await alice.call_tool("words", {"count": 3000, "prefix": "secret"}))
        with pytest.raises(MCPError, match="Resource not found"):
            await mallory.read_resource(uri)
        with pytest.raises(MCPError, match="Resource not found"):
            await mallory.read_resource(uri + "?page=2")
        assert (await alice.read_resource(uri)).contents[0].text.startswith("secret0 secret1")


async def test_exhausted_budget_answers_without_calling_upstream(proxied, relay, issuer):
    async with client(proxied.url, issuer.token("alice", alg="HS256")) as session:
        for _ in range(30):
            result = await session.call_tool("words", {"count": 3000})
            if result.meta[META].get("exhausted"):
                break
        else:
            pytest.fail("the budget never ran out")
        assert result.is_error
        assert text_of(result).startswith("[BUDGET EXHAUSTED:")
        assert result.meta[META]["available"] < 500
        before = relay.count("words")
        again = await session.call_tool("words", {"count": 1})
        assert text_of(again).startswith("[BUDGET EXHAUSTED:")
        assert relay.count("words") == before
    # A new session starts with a full budget.
    async with client(proxied.url, issuer.token("alice", alg="HS256")) as session:
        assert text_of(await session.call_tool("words", {"count": 5})) == words(5)


def figures(base: str, tool: str) -> dict[str, float]:
    """The sidecar's result series for `tool` from /metrics: histogram counts and sums, truncations."""
    status, body = http_get(f"{base}/metrics")
    assert status == 200
    wanted = {f'toolmesh_tool_result_tokens_count{{tool="{tool}"}}': "tokens_count",
              f'toolmesh_tool_result_tokens_sum{{tool="{tool}"}}': "tokens_sum",
              f'toolmesh_tool_result_bytes_count{{tool="{tool}"}}': "bytes_count",
              f'toolmesh_tool_result_bytes_sum{{tool="{tool}"}}': "bytes_sum",
              f'toolmesh_budget_truncations_total{{tool="{tool}"}}': "truncations"}
    found = dict.fromkeys(wanted.values(), 0.0)
    for line in body.decode().splitlines():
        series, _, value = line.rpartition(" ")
        if series in wanted:
            found[wanted[series]] = float(value)
    return found


async def test_metrics_count_result_tokens_bytes_and_truncations_per_tool(proxied, issuer):
    async with client(proxied.url, issuer.token("metrics-reader", alg="HS256")) as session:
        # Series are labelled by tools the server listed (others share `_unlisted`): list, as clients do.
        await session.list_tools()
        before = figures(proxied.base, "words")
        small = await session.call_tool("words", {"count": 10})
        after_small = figures(proxied.base, "words")
        assert after_small["tokens_count"] == before["tokens_count"] + 1
        assert after_small["tokens_sum"] == before["tokens_sum"] + small.meta[META]["resultTokens"] == \
            before["tokens_sum"] + 20
        assert after_small["bytes_count"] == before["bytes_count"] + 1
        assert after_small["bytes_sum"] - before["bytes_sum"] > len(words(10))
        assert after_small["truncations"] == before["truncations"]

        large = await session.call_tool("words", {"count": 3000})
        assert large.meta[META]["truncated"] is True
        after_large = figures(proxied.base, "words")
        assert after_large["truncations"] == after_small["truncations"] + 1
        assert after_large["tokens_count"] == after_small["tokens_count"] + 1
        # What entered the caller's context: the kept share, not the 8000 tokens the tool returned.
        assert after_large["tokens_sum"] == after_small["tokens_sum"] + large.meta[META]["keptTokens"]
