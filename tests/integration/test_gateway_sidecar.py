"""Gateway → real sidecar → SDK server: heartbeats from the sidecar itself, and the sidecar's policy judging callers."""

from __future__ import annotations

import contextlib
import signal
import time

import aiohttp
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from helpers import async_wait_until, free_port, wait_until
from helpers.mcp_servers import everything_http_server
from helpers.registry_procs import get_json, registry_process, toy_server
from helpers.sidecar import guarded_sidecar, ready, sidecar
from helpers.tokens import TokenIssuer

SECRET = "heartbeat-secret"


def gateway_client(registry: str, token: str | None = None, mode: str = "legacy") -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    transport = streamable_http_client(f"{registry}/mcp", http_client=create_mcp_http_client(headers=headers))
    return Client(transport, mode=mode)


async def tool_names(registry: str) -> list[str]:
    return [t["name"] for t in (await get_json(f"{registry}/v1/tools"))["tools"]]


async def test_a_sidecar_reports_its_upstreams_tools_and_leaves_when_stopped(tmp_path):
    env = {"TOOLMESH_REGISTRY_SECRET": SECRET}
    with (registry_process(tmp_path, secret=SECRET) as registry,
          toy_server(tmp_path, "alpha", "echo,slow") as (_, upstream)):
        with sidecar(["--upstream", upstream], tmp_path, "--server-name", "alpha", "--registry", registry,
                     env=env) as proc:
            async def listed():
                return await tool_names(registry) == ["alpha__echo", "alpha__slow"]

            await async_wait_until(listed, timeout=15, what="the sidecar's heartbeat to list alpha's tools")
            tools = {t["name"]: t for t in (await get_json(f"{registry}/v1/tools"))["tools"]}
            assert tools["alpha__echo"]["inputSchema"]["properties"]["message"]["type"] == "string"
            (server,) = (await get_json(f"{registry}/v1/servers"))["servers"]
            assert server["instances"][0]["endpoint"] == proc.url

            async with gateway_client(registry) as client:
                result = await client.call_tool("alpha__echo", {"message": "via sidecar"})
                assert [c.text for c in result.content] == ["alpha:via sidecar"]

            async def counted():
                stats = {t["name"]: t["stats"] for t in (await get_json(f"{registry}/v1/tools"))["tools"]}
                return stats["alpha__echo"] if stats["alpha__echo"].get("count", 0) >= 1 else None

            echo = await async_wait_until(counted, timeout=10, what="per-tool stats in a heartbeat")
            # What the result cost: its bytes (the answer carries at least its text); no budget, so no tokens.
            assert echo["result_bytes_total"] > len("alpha:via sidecar")
            assert "result_tokens_p95" not in echo and "truncations" not in echo
            (server,) = (await get_json(f"{registry}/v1/servers"))["servers"]
            assert server["instances"][0]["stats"]["echo"]["result_bytes_total"] == echo["result_bytes_total"]
            proc.proc.send_signal(signal.SIGTERM)
            proc.proc.wait(timeout=10)
            # A clean stop says goodbye: the tools leave now, not after missed heartbeats.
            assert await tool_names(registry) == []


async def test_a_sidecar_with_the_wrong_secret_is_not_listed(tmp_path):
    with (registry_process(tmp_path, secret=SECRET) as registry,
          toy_server(tmp_path, "alpha") as (_, upstream)):
        with sidecar(["--upstream", upstream], tmp_path, "--server-name", "intruder", "--registry", registry,
                     env={"TOOLMESH_REGISTRY_SECRET": "guess"}, name="intruder"), \
             sidecar(["--upstream", upstream], tmp_path, "--server-name", "honest", "--registry", registry,
                     env={"TOOLMESH_REGISTRY_SECRET": SECRET}, name="honest"):
            async def honest_listed():
                return "honest__echo" in await tool_names(registry)

            await async_wait_until(honest_listed, timeout=15, what="the honest sidecar to be listed")
            deadline = time.monotonic() + 1.0  # five heartbeat intervals of the registry
            while time.monotonic() < deadline:
                assert await tool_names(registry) == ["honest__echo"]


async def test_a_killed_sidecar_leaves_within_the_heartbeat_deadline(tmp_path):
    env = {"TOOLMESH_REGISTRY_SECRET": SECRET}
    with (registry_process(tmp_path, secret=SECRET, interval=0.2, missed=3) as registry,
          toy_server(tmp_path, "alpha") as (_, upstream)):
        with sidecar(["--upstream", upstream], tmp_path, "--server-name", "alpha", "--registry", registry,
                     env=env) as proc:
            async def listed():
                return await tool_names(registry) == ["alpha__echo"]

            await async_wait_until(listed, timeout=15, what="alpha listed")
            proc.proc.kill()
            proc.proc.wait(timeout=10)
            killed = time.monotonic()

            async def gone():
                return await tool_names(registry) == []

            await async_wait_until(gone, timeout=5, what="a killed sidecar's tools to leave")
            assert time.monotonic() - killed < 3


@pytest.fixture
def guarded(tmp_path):
    """A sidecar whose policy lets only callers with the `echo:call` scope call echo."""
    issuer = TokenIssuer("internal-ci")
    (tmp_path / "jwt-secret").write_text(issuer.secret)
    policy = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": "guard"},
              "spec": {"auth": {"issuers": [{"issuer": "internal-ci", "audiences": ["toolmesh"], "algorithms": ["HS256"],
                                             "secretFile": str(tmp_path / "jwt-secret")}]},
                       "authorization": {"defaultScopes": ["mcp:admin"],
                                         "rules": [{"tools": ["echo"], "scopes": ["echo:call"]}]}}}
    return issuer, policy


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_gateway_is_never_a_bypass_of_the_sidecars_policy(tmp_path, guarded, mode):
    issuer, policy = guarded
    with (registry_process(tmp_path, secret=SECRET) as registry,
          toy_server(tmp_path, "alpha") as (_, upstream)):
        with guarded_sidecar(["--upstream", upstream], tmp_path, policy, "--server-name", "alpha",
                             "--registry", registry, env={"TOOLMESH_REGISTRY_SECRET": SECRET}):
            async def listed():
                return await tool_names(registry) == ["alpha__echo"]

            await async_wait_until(listed, timeout=15, what="alpha listed")
            allowed = issuer.token("alice", "echo:call", alg="HS256")
            async with gateway_client(registry, allowed, mode) as client:
                assert "alpha__echo" in {t.name for t in (await client.list_tools()).tools}
                result = await client.call_tool("alpha__echo", {"message": "ok"})
                assert [c.text for c in result.content] == ["alpha:ok"]
            denied = issuer.token("mallory", "other:scope", alg="HS256")
            async with gateway_client(registry, denied, mode) as client:
                # Each caller is shown only what the sidecar would show it directly ...
                assert {t.name for t in (await client.list_tools()).tools} == {"toolmesh__run_workflow"}
                # ... and a call by name is refused all the same, without ending the caller's session.
                with pytest.raises(Exception, match="(?i)scope|forbidden|denied"):
                    await client.call_tool("alpha__echo", {"message": "no"})
                assert {t.name for t in (await client.list_tools()).tools} == {"toolmesh__run_workflow"}
            async with gateway_client(registry, None, mode) as client:
                assert {t.name for t in (await client.list_tools()).tools} == {"toolmesh__run_workflow"}
                with pytest.raises(Exception, match="(?i)auth|token|401"):
                    await client.call_tool("alpha__echo", {"message": "anonymous"})
            # Delegated tasks carry the caller's token too: the same policy judges them.
            workflow = {"tasks": [{"id": "t", "server": "alpha", "tool": "echo", "arguments": {"message": "wf"}}]}
            async with aiohttp.ClientSession() as http:
                for token, state in ((allowed, "succeeded"), (denied, "failed")):
                    async with http.post(f"{registry}/v1/workflows?wait=true", json=workflow,
                                         headers={"Authorization": f"Bearer {token}"}) as resp:
                        run = await resp.json()
                    assert run["tasks"]["t"]["state"] == state, run
                assert "scope" in run["tasks"]["t"]["error"]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_restarted_upstream_that_forgets_the_session_with_a_400_gets_a_new_one(tmp_path, mode):
    """The reference everything server answers a session it forgot with HTTP 400 "No valid session ID provided"
    (the spec says 404): the gateway's next call through the sidecar opens a new session instead of failing."""
    env = {"TOOLMESH_REGISTRY_SECRET": SECRET}
    port = free_port()
    with registry_process(tmp_path, secret=SECRET) as registry, contextlib.ExitStack() as first:
        upstream = first.enter_context(everything_http_server(port=port, log_path=tmp_path / "everything-1.log"))
        with sidecar(["--upstream", upstream], tmp_path, "--server-name", "everything", "--registry", registry,
                     env=env) as proc:
            async def listed():
                return "everything__get-sum" in await tool_names(registry)

            await async_wait_until(listed, timeout=30, what="the everything server's tools listed")
            async with gateway_client(registry, mode=mode) as client:
                result = await client.call_tool("everything__get-sum", {"a": 1, "b": 2})
                assert not result.is_error and "3" in result.content[0].text
                first.close()  # the upstream stops, and comes back on the same port knowing no session
                with everything_http_server(port=port, log_path=tmp_path / "everything-2.log"):
                    wait_until(lambda: ready(proc.base), timeout=30, what="the sidecar ready again")
                    result = await client.call_tool("everything__get-sum", {"a": 20, "b": 22})
                    assert not result.is_error and "42" in result.content[0].text, result
