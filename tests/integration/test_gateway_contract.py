"""The gateway as agents meet it: a call's failure stays the call's, auth spoken at the gateway's own door, bare
names that respect the caller, the registry's /metrics, and `registry --kube` without a cluster."""

from __future__ import annotations

import re
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from helpers import async_wait_until, free_port, toolmesh_cli
from helpers.fault_upstream import Fault
from helpers.registry_procs import get_json, post_heartbeat, registry_process, toy_server
from helpers.sidecar import sidecar
from helpers.tokens import TokenIssuer

SECRET = "heartbeat-secret"


def test_registry_kube_without_a_cluster_exits_2_with_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    done = toolmesh_cli("registry", "--kube", "--listen", "127.0.0.1:0", timeout=60,
                        env={"HOME": str(home), "KUBECONFIG": str(tmp_path / "no-kubeconfig")})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("toolmesh registry: --kube: cannot reach Kubernetes"), done.stderr
    assert "Traceback" not in done.stderr


# -- 1. a call's failure is the call's --------------------------------------------------------------------------


def gateway_client(registry: str, token: str | None = None, mode: str = "legacy") -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    transport = streamable_http_client(f"{registry}/mcp", http_client=create_mcp_http_client(headers=headers))
    return Client(transport, mode=mode)


async def failure(call: Awaitable[Any]) -> str | None:
    """The error message a call ends with (a JSON-RPC error or an error result), or None when it succeeds."""
    try:
        result = await call
    except Exception as exc:  # noqa: BLE001 - the SDK raises its own error type for JSON-RPC errors
        return str(exc)
    return result.content[0].text if result.is_error else None


async def answer(call: Awaitable[Any]) -> str:
    """The text a call answers with, or its error message."""
    try:
        return (await call).content[0].text
    except Exception as exc:  # noqa: BLE001
        return str(exc)


async def listed_names(client: Client) -> set[str]:
    return {t.name for t in (await client.list_tools()).tools}


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_an_upstream_503_fails_that_call_only(tmp_path, relay, mode):
    with registry_process(tmp_path, secret=SECRET) as registry, \
            sidecar(["--upstream", relay.url], tmp_path, "--server-name", "s503", "--registry", registry,
                    env={"TOOLMESH_REGISTRY_SECRET": SECRET}):
        async def listed():
            return "s503__lookup" in {t["name"] for t in (await get_json(f"{registry}/v1/tools"))["tools"]}

        await async_wait_until(listed, timeout=20, what="s503 listed")
        relay.inject("lookup", Fault("status", 503))
        async with gateway_client(registry, mode=mode) as client:
            before = await listed_names(client)
            seen = {"503 call": await failure(client.call_tool("s503__lookup", {"q": "x"})),
                    "other tool": await failure(client.call_tool("s503__whoami", {"q": "after"})),
                    "listed": await listed_names(client) == before,
                    "same tool again": await failure(client.call_tool("s503__lookup", {"q": "again"}))}
        # One call failed, saying what happened; the server's other tools still answer and its tools stay listed.
        assert seen == {"503 call": "server s503 is unavailable: it answered HTTP 503 without a JSON-RPC response",
                        "other tool": None, "listed": True, "same tool again": None}
        (server,) = (await get_json(f"{registry}/v1/servers"))["servers"]
        assert server["instances"][0]["healthy"] and server["instances"][0]["unreachable"] is None


async def test_an_unreachable_sidecar_stays_listed_and_its_calls_say_so(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    tools = [{"name": "ping", "inputSchema": {"type": "object"}}]
    # Heartbeats every minute: nothing but the gateway's own call can change what it lists meanwhile.
    with registry_process(tmp_path, interval=60) as registry:
        status, _ = await post_heartbeat(registry, {"server": "gone", "endpoint": dead, "tools": tools})
        assert status == 200
        async with gateway_client(registry) as client:
            assert "gone__ping" in await listed_names(client)
            seen = [await failure(client.call_tool("gone__ping", {})) for _ in range(2)]
            still_listed = "gone__ping" in await listed_names(client)
        assert all(re.fullmatch(r"server gone is unavailable: .*(refused|connect).*", m or "") for m in seen), seen
        assert still_listed
        (server,) = (await get_json(f"{registry}/v1/servers"))["servers"]
        assert server["instances"][0]["healthy"] and server["instances"][0]["unreachable"]


# -- 7. bare names respect the caller -----------------------------------------------------------------------------


def scoped_policy(tmp_path: Path, issuer: TokenIssuer, name: str, scope: str) -> Path:
    """A policy trusting `issuer` that lets only callers holding `scope` call echo."""
    secret = tmp_path / "jwt-secret"
    secret.write_text(issuer.secret)
    policy = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": name},
              "spec": {"auth": {"issuers": [{"issuer": issuer.issuer, "audiences": ["toolmesh"],
                                             "algorithms": ["HS256"], "secretFile": str(secret)}]},
                       "authorization": {"defaultScopes": ["mcp:admin"],
                                         "rules": [{"tools": ["echo"], "scopes": [scope]}]}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


async def test_a_bare_name_goes_to_the_best_server_that_lets_this_caller_call_it(tmp_path):
    issuer = TokenIssuer("internal-ci")
    env = {"TOOLMESH_REGISTRY_SECRET": SECRET}
    with (registry_process(tmp_path, secret=SECRET) as registry,
          toy_server(tmp_path, "high") as (_, high_url), toy_server(tmp_path, "low") as (_, low_url),
          sidecar(["--upstream", high_url], tmp_path, "--server-name", "high", "--registry", registry,
                  "--policy", str(scoped_policy(tmp_path, issuer, "high", "high:call")),
                  env={**env, "TOOLMESH_SERVER_PRIORITY": "10"}, name="high"),
          sidecar(["--upstream", low_url], tmp_path, "--server-name", "low", "--registry", registry,
                  "--policy", str(scoped_policy(tmp_path, issuer, "low", "low:call")),
                  env={**env, "TOOLMESH_SERVER_PRIORITY": "1"}, name="low")):
        async def both_listed():
            names = {t["name"] for t in (await get_json(f"{registry}/v1/tools"))["tools"]}
            return {"high__echo", "low__echo"} <= names

        await async_wait_until(both_listed, timeout=20, what="both servers listed")
        seen = {}
        for scope in ("low:call", "high:call", "high:call low:call"):
            async with gateway_client(registry, issuer.token("alice", scope, alg="HS256")) as client:
                seen[scope] = await answer(client.call_tool("echo", {"message": "bare"}))
        async with gateway_client(registry, issuer.token("mallory", "other", alg="HS256")) as client:
            seen["other"] = await failure(client.call_tool("echo", {"message": "bare"}))
        assert seen == {"low:call": "low:bare", "high:call": "high:bare", "high:call low:call": "high:bare",
                        "other": seen["other"]}
        # Nobody lists it to this caller: the winner by priority answers, and its sidecar says why not.
        assert "scope" in (seen["other"] or "")
