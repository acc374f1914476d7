"""Attacks on the sidecar's authentication, each expected to be refused with the right status before reaching the upstream."""

from __future__ import annotations

import json
import time

import httpx2
import pytest
import yaml

from helpers.mcp_servers import sdk_http_server
from helpers.stateless_calls import post_tools_call
from helpers.sidecar import sidecar
from helpers.tokens import JwksServer, TokenIssuer, tampered


@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer("https://login.test")


@pytest.fixture(scope="module")
def guarded(issuer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacks")
    policy = {
        "auth": {"issuers": [{"issuer": issuer.issuer, "audiences": ["toolmesh"], "jwksUrl": "set below",
                              "algorithms": ["RS256", "ES256"]}]},
        "authorization": {"rules": [{"tools": ["echo", "show_headers"], "scopes": ["tools:read"]}]},
        "audit": {"sink": str(tmp / "audit.log")},
    }
    with JwksServer(issuer) as jwks, sdk_http_server(log_path=tmp / "server.log") as upstream:
        policy["auth"]["issuers"][0]["jwksUrl"] = jwks.url
        path = tmp / "policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        with sidecar(["--upstream", upstream], tmp, "--policy", str(path)) as sc:
            sc.audit_path = tmp / "audit.log"
            yield sc


async def call(url: str, tool: str, token: str | None, **headers: str) -> httpx2.Response:
    return await post_tools_call(url, tool, {"text": "x"} if tool == "echo" else {}, token=token, **headers)


def forged(issuer: TokenIssuer) -> dict[str, str]:
    now = int(time.time())
    other = TokenIssuer(issuer.issuer)  # same name, keys the sidecar never saw
    return {
        "alg none": issuer.unsigned_token(scopes="tools:read"),
        "hs256 signed with the rs256 public key": issuer.hs256_with_public_key(scopes="tools:read"),
        "expired": issuer.token(scopes="tools:read", exp=now - 3600),
        "not yet valid": issuer.token(scopes="tools:read", nbf=now + 3600),
        "wrong audience": issuer.token(scopes="tools:read", aud="another-service"),
        "wrong issuer": issuer.token(scopes="tools:read", iss="https://evil.test"),
        "unknown kid": other.token(scopes="tools:read", kid="stolen-kid"),
        "right kid, foreign key": other.token(scopes="tools:read"),
        "tampered payload": tampered(issuer.token("alice", "nothing"), scope="tools:read", sub="root"),
        "no expiry": issuer.token(scopes="tools:read", exp=None),
        "not a jwt": "definitely-not-a-jwt",
    }


@pytest.mark.parametrize("attack", list(forged(TokenIssuer("x")).keys()))
async def test_forged_tokens_get_401(guarded, issuer, attack):
    token = forged(issuer)[attack]
    resp = await call(guarded.url, "echo", token)
    assert resp.status_code == 401, resp.text
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert resp.json()["error"]["code"] == -32003
    assert token not in guarded.audit_path.read_text()


async def test_the_genuine_token_is_accepted(guarded, issuer):
    resp = await call(guarded.url, "echo", issuer.token("alice", "tools:read"))
    assert resp.status_code == 200, resp.text


async def test_missing_scope_gets_403(guarded, issuer):
    resp = await call(guarded.url, "add", issuer.token("alice", "tools:read"))
    assert resp.status_code == 403
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]


async def test_wrong_authorization_scheme_gets_401(guarded, issuer):
    resp = await call(guarded.url, "echo", None, Authorization=f"Basic {issuer.token('alice', 'tools:read')}")
    assert resp.status_code == 401


async def test_spoofed_identity_headers_never_reach_the_upstream(guarded, issuer):
    resp = await call(guarded.url, "show_headers", issuer.token("alice", "tools:read"),
                      **{"X-Toolmesh-Subject": "root", "X-Toolmesh-Scopes": "mcp:admin", "x-toolmesh-SUBJECT": "r2"})
    assert resp.status_code == 200, resp.text
    body = resp.json() if resp.headers["Content-Type"].startswith("application/json") else json.loads(
        next(line[5:] for line in resp.text.splitlines() if line.startswith("data:")))
    seen = json.loads(body["result"]["content"][0]["text"])
    assert seen["x-toolmesh-subject"] == "alice"
    assert seen["x-toolmesh-scopes"] == "tools:read"
    assert "authorization" not in seen


async def test_spoofed_headers_without_a_token_are_still_401(guarded):
    resp = await call(guarded.url, "show_headers", None, **{"X-Toolmesh-Subject": "root", "X-Toolmesh-Scopes": "mcp:admin"})
    assert resp.status_code == 401


async def test_without_auth_a_client_cannot_forge_an_identity_either(tmp_path):
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    spoof = {"X-Toolmesh-Subject": "root", "X-Toolmesh-Scopes": "mcp:admin"}
    with sdk_http_server(log_path=tmp_path / "server.log") as upstream, \
            sidecar(["--upstream", upstream], tmp_path) as sc:
        http = create_mcp_http_client(headers=spoof)
        async with Client(streamable_http_client(sc.url, http_client=http), mode="legacy") as session:
            result = await session.call_tool("show_headers", {})
    seen = json.loads(result.content[0].text)
    assert "x-toolmesh-subject" not in seen and "x-toolmesh-scopes" not in seen


@pytest.mark.parametrize("field", ["jku", "x5u"])
async def test_keys_named_by_the_token_itself_are_never_fetched(guarded, issuer, field):
    attacker = TokenIssuer(issuer.issuer)
    with JwksServer(attacker) as attacker_jwks:
        token = attacker.token("mallory", "tools:read", kid="attacker-1", header={field: attacker_jwks.url})
        resp = await call(guarded.url, "echo", token)
        assert resp.status_code == 401
        assert attacker_jwks.fetches == 0


async def test_embedded_jwk_header_is_not_trusted(guarded, issuer):
    from jwt.algorithms import RSAAlgorithm

    attacker = TokenIssuer(issuer.issuer)
    jwk = json.loads(RSAAlgorithm.to_jwk(attacker.rsa_key.public_key()))
    token = attacker.token("mallory", "tools:read", header={"jwk": jwk})
    resp = await call(guarded.url, "echo", token)
    assert resp.status_code == 401
