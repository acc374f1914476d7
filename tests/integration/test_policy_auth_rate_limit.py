"""Rate limits through the real sidecar: a bucket per verified subject, a tighter one per tool, 429 with Retry-After."""

from __future__ import annotations

import httpx2
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from helpers import ROOT
from helpers.mcp_servers import sdk_http_server
from helpers.stateless_calls import STATELESS_ERA, post_tools_call
from helpers.sidecar import guarded_sidecar
from helpers.tokens import TokenIssuer



@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer("rate-issuer")


@pytest.fixture(scope="module")
def limited(issuer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rate")
    manifest = yaml.safe_load((ROOT / "examples/policies/rate-limit.yaml").read_text())
    spec = manifest["spec"]
    # Slow refill, so a loaded machine cannot earn a token back between calls.
    spec["rateLimit"]["requestsPerSecond"] = 0.01
    spec["rateLimit"]["burst"] = 4
    spec["rateLimit"]["tools"][0]["tools"] = ["add"]
    spec["auth"] = issuer.hmac_auth()
    with sdk_http_server(log_path=tmp / "server.log") as upstream, \
            guarded_sidecar(["--upstream", upstream], tmp, manifest) as sc:
        yield sc


async def call(url: str, token: str, tool: str, arguments: dict) -> httpx2.Response:
    return await post_tools_call(url, tool, arguments, token=token, request_id=9)


async def test_each_subject_has_its_own_bucket_and_gets_429_with_retry_after(limited, issuer):
    alice, bob = issuer.token("alice", alg="HS256"), issuer.token("bob", alg="HS256")
    statuses = [(await call(limited.url, alice, "echo", {"text": "x"})).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    refused = await call(limited.url, alice, "echo", {"text": "x"})
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 60
    error = refused.json()["error"]
    assert error["code"] == -32005 and error["data"]["retryAfterSeconds"] > 60
    assert (await call(limited.url, bob, "echo", {"text": "x"})).status_code == 200


async def test_a_tool_rule_has_its_own_tighter_bucket(limited, issuer):
    carol = issuer.token("carol", alg="HS256")
    assert (await call(limited.url, carol, "add", {"a": 1, "b": 2})).status_code == 200
    assert (await call(limited.url, carol, "add", {"a": 1, "b": 2})).status_code == 429
    assert (await call(limited.url, carol, "echo", {"text": "x"})).status_code == 200


async def test_sdk_client_sees_the_rate_limit_as_an_error(limited, issuer):
    token = issuer.token("dave", alg="HS256")
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with Client(streamable_http_client(limited.url, http_client=http), mode=STATELESS_ERA) as session:
        await session.call_tool("add", {"a": 1, "b": 1})
        with pytest.raises(MCPError, match="rate limit exceeded for tool 'add'"):
            await session.call_tool("add", {"a": 1, "b": 1})


async def test_limits_and_auth_results_are_in_metrics(limited, issuer):
    from helpers.sidecar import http_get

    erin = issuer.token("erin", alg="HS256")
    for _ in range(2):
        await call(limited.url, erin, "add", {"a": 1, "b": 2})
    await call(limited.url, "not-a-token", "echo", {"text": "x"})
    status, body = http_get(f"{limited.base}/metrics")
    text = body.decode()
    assert status == 200

    def value(series: str) -> float:
        line = next(line for line in text.splitlines() if line.startswith(series + " "))
        return float(line.rsplit(" ", 1)[1])

    assert value("toolmesh_rate_limited_total") >= 1
    assert value("toolmesh_rate_limit_buckets") >= 2
    assert value('toolmesh_auth_requests_total{result="invalid"}') >= 1
    assert value('toolmesh_auth_requests_total{result="verified"}') >= 1
    assert value('toolmesh_auth_requests_total{result="cached"}') >= 1
