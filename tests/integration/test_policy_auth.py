"""Authentication, authorization and audit through the real sidecar: SDK clients with real JWTs in front of an SDK server.

Three issuers are trusted at once: RS256 keys from a JWKS served over loopback,
an ES256 PEM key, and an HS256 secret read from a file (as a mounted Secret).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import orjson
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import TextContent

from helpers import ROOT, wait_until
from helpers.mcp_servers import sdk_http_server
from helpers.stateless_calls import STATELESS_ERA
from helpers.sidecar import guarded_sidecar, http_get
from helpers.tokens import JwksServer, TokenIssuer


@pytest.fixture(scope="module")
def jwks_issuer():
    issuer = TokenIssuer("https://login.test")
    with JwksServer(issuer) as server:
        yield issuer, server


@pytest.fixture(scope="module")
def pem_issuer():
    return TokenIssuer("https://pem.test")


@pytest.fixture(scope="module")
def hmac_issuer():
    return TokenIssuer("internal-ci")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with sdk_http_server(log_path=tmp_path_factory.mktemp("up") / "server.log") as url:
        yield url


def auth_policy(tmp: Path, jwks_issuer, pem_issuer, hmac_issuer) -> dict:
    """The authorization example's rules, made to fit the fixture server's tools and this test's issuers."""
    issuer, jwks = jwks_issuer
    (tmp / "jwt-secret").write_text(hmac_issuer.secret + "\n")
    manifest = yaml.safe_load((ROOT / "examples/policies/authorization.yaml").read_text())
    spec = manifest["spec"]
    spec["auth"]["issuers"] = [
        {"issuer": issuer.issuer, "audiences": ["toolmesh"], "jwksUrl": jwks.url},
        {"issuer": pem_issuer.issuer, "audiences": ["toolmesh"], "publicKey": pem_issuer.public_pem("ec"),
         "algorithms": ["ES256"]},
        {"issuer": hmac_issuer.issuer, "audiences": ["toolmesh"], "secretFile": str(tmp / "jwt-secret")},
    ]
    spec["authorization"]["rules"] = [
        {"tools": ["echo"], "scopes": ["tools:echo", "admin"]},
        {"tools": ["add"], "scopes": ["math"]},
        {"tools": ["show_*"], "scopes": []},
    ] + spec["authorization"]["rules"]
    spec["audit"] = {"sink": str(tmp / "audit.log")}
    return manifest


@pytest.fixture(scope="module")
def guarded(upstream, jwks_issuer, pem_issuer, hmac_issuer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    policy = auth_policy(tmp, jwks_issuer, pem_issuer, hmac_issuer)
    with guarded_sidecar(["--upstream", upstream], tmp, policy) as sc:
        sc.audit_path = tmp / "audit.log"
        yield sc


def client(url: str, token: str | None, mode: str = "legacy", **headers: str) -> Client:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    http = create_mcp_http_client(headers=headers)
    return Client(streamable_http_client(url, http_client=http), mode=mode)


def text_of(result) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def raw_call(url: str, tool: str, token: str | None = None, **headers: str) -> httpx2.Response:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {}}}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(url, content=orjson.dumps(message), headers={
            "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": STATELESS_ERA, "Mcp-Method": "tools/call", "Mcp-Name": tool, **headers})


@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA])
async def test_caller_sees_and_calls_only_its_tools(guarded, jwks_issuer, mode):
    issuer, _ = jwks_issuer
    async with client(guarded.url, issuer.token("alice", "tools:echo"), mode) as session:
        names = {t.name for t in (await session.list_tools()).tools}
        assert names == {"echo", "show_meta", "show_headers"}
        assert text_of(await session.call_tool("echo", {"text": "hi"})) == "hi"
        with pytest.raises(MCPError, match="insufficient scope for tool 'add'"):
            await session.call_tool("add", {"a": 1, "b": 2})
    async with client(guarded.url, issuer.token("root", "mcp:admin math"), mode) as session:
        names = {t.name for t in (await session.list_tools()).tools}
        assert {"add", "slow", "count", "fail", "show_headers"} <= names and "echo" not in names
        assert text_of(await session.call_tool("add", {"a": 2, "b": 40})) == "42"


@pytest.mark.parametrize("kind", ["es256-pem", "hs256-secret-file"])
async def test_every_issuer_kind_is_accepted(guarded, pem_issuer, hmac_issuer, kind):
    token = pem_issuer.token("bob", ["math"], alg="ES256") if kind == "es256-pem" else hmac_issuer.token(
        "ci-bot", "math", alg="HS256")
    async with client(guarded.url, token) as session:
        assert text_of(await session.call_tool("add", {"a": 1, "b": 1})) == "2"


async def test_no_token_gets_401_with_a_pointer_to_the_metadata(guarded, jwks_issuer):
    resp = await raw_call(guarded.url, "echo")
    assert resp.status_code == 401
    challenge = resp.headers["WWW-Authenticate"]
    metadata_url = f"{guarded.base}/.well-known/oauth-protected-resource"
    assert challenge == f'Bearer resource_metadata="{metadata_url}"'
    assert resp.json()["error"]["code"] == -32003
    status, body = http_get(metadata_url)
    assert status == 200
    document = json.loads(body)
    issuer, _ = jwks_issuer
    assert document["resource"] == guarded.url
    assert document["authorization_servers"] == [issuer.issuer, "https://pem.test", "internal-ci"]
    assert {"tools:echo", "math", "mcp:admin"} <= set(document["scopes_supported"])
    assert document["bearer_methods_supported"] == ["header"]
    status, _ = http_get(metadata_url + "/mcp")
    assert status == 200


async def test_missing_scope_gets_403_insufficient_scope(guarded, jwks_issuer):
    issuer, _ = jwks_issuer
    resp = await raw_call(guarded.url, "add", issuer.token("alice", "tools:echo"))
    assert resp.status_code == 403
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    assert 'scope="math"' in resp.headers["WWW-Authenticate"]
    assert resp.json()["error"]["data"]["requiredScopes"] == ["math"]


async def test_upstream_gets_the_verified_identity_and_never_the_token(guarded, jwks_issuer):
    issuer, _ = jwks_issuer
    token = issuer.token("alice", ["tools:echo", "docs:read"])
    spoof = {"X-Toolmesh-Subject": "root", "X-Toolmesh-Scopes": "mcp:admin"}
    async with client(guarded.url, token, **spoof) as session:
        seen = json.loads(text_of(await session.call_tool("show_headers", {})))
    assert seen["x-toolmesh-subject"] == "alice"
    assert seen["x-toolmesh-scopes"] == "docs:read tools:echo"
    assert "authorization" not in seen
    assert token not in json.dumps(seen)


async def test_audit_log_records_decisions_without_tokens(guarded, jwks_issuer):
    issuer, _ = jwks_issuer
    token = issuer.token("audited-user", "tools:echo")
    async with client(guarded.url, token) as session:
        await session.call_tool("echo", {"text": "x"})
    await raw_call(guarded.url, "add", token)

    def lines():
        text = guarded.audit_path.read_text()
        return [json.loads(line) for line in text.splitlines() if "audited-user" in line]

    found = wait_until(lambda: len(lines()) >= 2 and lines(), timeout=5, what="audit lines")
    assert [(e["tool"], e["allowed"]) for e in found] == [("echo", True), ("add", False)]
    assert all(e["method"] == "tools/call" and e["time"].endswith("Z") for e in found)
    assert token not in guarded.audit_path.read_text()


async def test_authorization_decisions_are_counted_in_metrics(guarded, jwks_issuer):
    issuer, _ = jwks_issuer
    await raw_call(guarded.url, "add", issuer.token("counted", "tools:echo"))
    status, body = http_get(f"{guarded.base}/metrics")
    assert status == 200
    refused = [line for line in body.decode().splitlines()
               if line.startswith("toolmesh_authz_decisions_total") and 'allowed="false"' in line and 'kind="tool"' in line]
    assert refused and float(refused[0].rsplit(" ", 1)[1]) >= 1
