"""Authorization of lists, resources and prompts through the real sidecar, against an SDK server that paginates tools/list."""

from __future__ import annotations

import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from helpers.guarded_server import TOOLS, guarded_http_server
from helpers.stateless_calls import STATELESS_ERA
from helpers.sidecar import guarded_sidecar
from helpers.tokens import TokenIssuer


@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer("lists-issuer")


@pytest.fixture(scope="module")
def guarded(issuer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lists")
    policy = {
        "auth": issuer.hmac_auth(),
        "authorization": {
            "rules": [
                {"tools": ["db_*"], "scopes": ["db"]},
                {"tools": ["docs_*"], "scopes": ["docs"]},
                {"tools": ["public_*"], "scopes": []},
            ],
            "resourceRules": [{"resources": ["file:///docs/*"], "scopes": ["docs"]}],
            "promptRules": [{"prompts": ["greet"], "scopes": []}],
        },
    }
    with guarded_http_server(tmp / "server.log") as upstream, \
            guarded_sidecar(["--upstream", upstream], tmp, policy) as sc:
        yield sc


def client(url: str, token: str, mode: str) -> Client:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    return Client(streamable_http_client(url, http_client=http), mode=mode, cache=None)


async def all_tools(session) -> tuple[list[str], int]:
    names, cursor, pages = [], None, 0
    while pages < 10:
        page = await session.list_tools(cursor=cursor)
        names += [t.name for t in page.tools]
        pages += 1
        cursor = page.next_cursor
        if not cursor:
            break
    return names, pages


@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA])
async def test_every_page_of_tools_list_is_filtered(guarded, issuer, mode):
    async with client(guarded.url, issuer.token("reader", "docs", alg="HS256"), mode) as session:
        names, pages = await all_tools(session)
    assert names == ["docs_search", "public_time"]
    assert pages == 3  # the upstream's pagination is kept, even for a page filtered to nothing
    async with client(guarded.url, issuer.token("root", "mcp:admin db docs", alg="HS256"), mode) as session:
        names, _ = await all_tools(session)
    assert names == list(TOOLS)


@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA])
async def test_resources_follow_their_rules(guarded, issuer, mode):
    async with client(guarded.url, issuer.token("reader", "docs", alg="HS256"), mode) as session:
        listed = [str(r.uri) for r in (await session.list_resources()).resources]
        assert listed == ["file:///docs/readme.md"]
        contents = (await session.read_resource("file:///docs/readme.md")).contents
        assert contents[0].text == "read me"
        with pytest.raises(MCPError, match="insufficient scope"):
            await session.read_resource("file:///secret/keys.txt")


@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA])
async def test_prompts_follow_their_rules(guarded, issuer, mode):
    async with client(guarded.url, issuer.token("someone", "", alg="HS256"), mode) as session:
        assert [p.name for p in (await session.list_prompts()).prompts] == ["greet"]
        prompt = await session.get_prompt("greet", {"name": "Ada"})
        assert "Hello Ada" in prompt.messages[0].content.text
        with pytest.raises(MCPError, match="insufficient scope"):
            await session.get_prompt("admin_prompt")
