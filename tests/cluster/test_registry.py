"""The registry in cluster mode on the real control plane: TokenReview-checked heartbeats, MCPServer.status, restarts."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
import yaml

from helpers import TOOLMESH, async_wait_until, free_port, port_open, running, wait_until
from helpers.operator_proc import install_crds
from helpers.registry_procs import beating, get_json, list_tools_of, post_heartbeat, toy_server
from helpers.sidecar import sidecar

pytestmark = pytest.mark.cluster


def apply_server(cluster, namespace: str, name: str, **spec) -> None:
    manifest = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": name},
                "spec": {"image": "example.org/mcp:1", **spec}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))


def status_of(cluster, namespace: str, name: str) -> dict:
    return cluster.kubectl_json("get", "mcpserver", name, "-n", namespace).get("status") or {}


def healthy_condition(status: dict) -> str | None:
    return next((c["status"] for c in status.get("conditions") or [] if c["type"] == "Healthy"), None)


def kube_registry(cluster, tmp_path: Path, name: str, interval: float = 0.3):
    port = free_port()
    cmd = [TOOLMESH, "registry", "--kube", "--listen", f"127.0.0.1:{port}", "--heartbeat-interval", str(interval)]
    return port, running(cmd, env=cluster.env, log_path=tmp_path / f"{name}.log")


async def tool_names(registry: str, token: str) -> list[str]:
    """The catalogue's tool names, read with a token TokenReview accepts (the catalogue is not for anyone)."""
    return [t["name"] for t in (await get_json(f"{registry}/v1/tools", token))["tools"]]


async def test_heartbeats_need_a_registry_token_and_status_follows_the_sidecar(cluster, namespace, tmp_path):
    install_crds(cluster)
    apply_server(cluster, namespace, "alpha", priority=4, capabilities=["echoing"], maxConcurrent=2)
    token_file = tmp_path / "token"
    token = cluster.token_for(namespace, "alpha", "toolmesh-registry")
    token_file.write_text(token)
    port, registry_proc = kube_registry(cluster, tmp_path, "registry")
    registry = f"http://127.0.0.1:{port}"
    with registry_proc as proc, toy_server(tmp_path, "alpha") as (_, upstream):
        wait_until(lambda: port_open(port) or proc.poll() is not None, timeout=30, what="registry")
        beat = {"server": "alpha", "endpoint": "http://127.0.0.1:1/mcp", "tools": [{"name": "x"}]}
        wrong_audience = cluster.token_for(namespace, "alpha", "some-other-service")
        assert (await post_heartbeat(registry, beat))[0] == 401
        assert (await post_heartbeat(registry, beat, secret=wrong_audience))[0] == 401
        assert (await post_heartbeat(registry, beat, secret="not-a-token"))[0] == 401
        assert await tool_names(registry, token) == []

        env = {"TOOLMESH_REGISTRY_TOKEN_FILE": str(token_file)}
        with sidecar(["--upstream", upstream], tmp_path, "--server-name", "alpha", "--registry", registry,
                     env=env) as sc:
            async def listed():
                return await tool_names(registry, token) == ["alpha__echo"]

            await async_wait_until(listed, timeout=30, what="alpha's tools via a TokenReview-checked heartbeat")
            # MCPServers of other tests in this cluster are listed too (unhealthy): pick ours.
            servers = (await get_json(f"{registry}/v1/servers", token))["servers"]
            (server,) = [s for s in servers if s["name"] == "alpha"]
            assert (server["priority"], server["capabilities"], server["maxConcurrent"]) == (4, ["echoing"], 2)

            def written():
                status = status_of(cluster, namespace, "alpha")
                return status.get("toolCount") == 1 and healthy_condition(status) == "True" and status

            status = cluster.wait_for(written, timeout=30, what="the registry to write MCPServer.status")
            assert status["tools"] == [{"name": "echo", "description": "Echo a message back, prefixed with alpha",
                                        "readOnly": False}]
            assert status["healthyInstances"] == 1 and status["lastHeartbeat"].endswith("Z")
            sc.proc.kill()
            sc.proc.wait(timeout=10)

            def unhealthy():
                status = status_of(cluster, namespace, "alpha")
                return healthy_condition(status) == "False" and status.get("healthyInstances") == 0

            cluster.wait_for(unhealthy, timeout=30, what="Healthy=False after missed heartbeats")
        assert proc.poll() is None


async def test_a_restarted_registry_serves_the_catalogue_from_status(cluster, namespace, tmp_path):
    install_crds(cluster)
    apply_server(cluster, namespace, "beta")
    token_file = tmp_path / "token"
    token = cluster.token_for(namespace, "beta", "toolmesh-registry")
    token_file.write_text(token)
    # The default 5 s interval: a status written within the last 15 s still counts after the restart.
    first_port, first = kube_registry(cluster, tmp_path, "first", interval=5)
    with toy_server(tmp_path, "beta") as (_, upstream):
        with first as proc:
            wait_until(lambda: port_open(first_port) or proc.poll() is not None, timeout=30, what="first registry")
            first_url = f"http://127.0.0.1:{first_port}"
            with sidecar(["--upstream", upstream], tmp_path, "--server-name", "beta", "--registry", first_url,
                         env={"TOOLMESH_REGISTRY_TOKEN_FILE": str(token_file)}, name="beta") as sc:
                # The operator owns status.endpoint; with no operator here, write what it would.
                cluster.kubectl("patch", "mcpserver", "beta", "-n", namespace, "--subresource=status",
                                "--type=merge", "-p", json.dumps({"status": {"endpoint": sc.url}}))
                cluster.wait_for(lambda: status_of(cluster, namespace, "beta").get("toolCount") == 1, timeout=30,
                                 what="the first registry's status write")
                proc.terminate()
                proc.wait(timeout=15)
                # A new registry, and no sidecar reporting to it: the API remembers.
                second_port, second = kube_registry(cluster, tmp_path, "second", interval=5)
                with second as proc2:
                    wait_until(lambda: port_open(second_port) or proc2.poll() is not None, timeout=30,
                               what="second registry")
                    second_url = f"http://127.0.0.1:{second_port}"
                    assert await tool_names(second_url, token) == ["beta__echo"]
                    from mcp.client import Client

                    async with Client(f"{second_url}/mcp", mode="legacy") as client:
                        result = await client.call_tool("beta__echo", {"message": "recovered"})
                    assert [c.text for c in result.content] == ["beta:recovered"]


async def test_two_replicas_agree_through_the_api(cluster, namespace, tmp_path):
    install_crds(cluster)
    apply_server(cluster, namespace, "gamma")
    token_file = tmp_path / "token"
    token = cluster.token_for(namespace, "gamma", "toolmesh-registry")
    token_file.write_text(token)
    env = {"TOOLMESH_REGISTRY_TOKEN_FILE": str(token_file)}
    a_port, a = kube_registry(cluster, tmp_path, "replica-a", interval=1)
    b_port, b = kube_registry(cluster, tmp_path, "replica-b", interval=1)
    replica_a, replica_b = f"http://127.0.0.1:{a_port}", f"http://127.0.0.1:{b_port}"
    with a as proc_a, b as proc_b, toy_server(tmp_path, "gamma") as (_, upstream):
        wait_until(lambda: port_open(a_port) and port_open(b_port), timeout=30, what="both replicas")
        with sidecar(["--upstream", upstream], tmp_path, "--server-name", "gamma", "--registry", replica_a,
                     env=env, name="to-a") as to_a, \
                sidecar(["--upstream", upstream], tmp_path, "--server-name", "gamma", "--registry", replica_b,
                        env=env, name="to-b") as to_b:
            cluster.kubectl("patch", "mcpserver", "gamma", "-n", namespace, "--subresource=status",
                            "--type=merge", "-p", json.dumps({"status": {"endpoint": to_b.url}}))
            for registry in (replica_a, replica_b):
                async def listed(registry=registry):
                    return await tool_names(registry, token) == ["gamma__echo"]

                await async_wait_until(listed, timeout=30, what=f"gamma at {registry}")
            # Each replica reports what it hears; the status adds the reports up.
            both = cluster.wait_for(lambda: (s := status_of(cluster, namespace, "gamma"))
                                    and len(s.get("reports") or []) == 2 and s.get("healthyInstances") == 2 and s,
                                    timeout=30, what="a report from each replica, two healthy sidecars in all")
            assert [r["healthyInstances"] for r in both["reports"]] == [1, 1], both["reports"]
            # The sidecar reporting to replica A goes away; B still hears gamma, and says so in the status.
            to_a.proc.kill()
            to_a.proc.wait(timeout=10)
            seen_false = []
            deadline = asyncio.get_running_loop().time() + 8  # several heartbeat deadlines of A
            while asyncio.get_running_loop().time() < deadline:
                status = status_of(cluster, namespace, "gamma")
                seen_false.append(healthy_condition(status) == "False")
                served = await tool_names(replica_a, token)
                assert served == ["gamma__echo"], (status, await get_json(f"{replica_a}/v1/servers", token))  # from B
                await asyncio.sleep(0.5)
            assert not any(seen_false)
            assert status_of(cluster, namespace, "gamma")["healthyInstances"] == 1, "A's report says it lost its own"
            from mcp.client import Client

            async with Client(f"{replica_a}/mcp", mode="legacy") as client:
                result = await client.call_tool("gamma__echo", {"message": "via A"})
            assert [c.text for c in result.content] == ["gamma:via A"]
            # Then B's sidecar goes too: nobody hears gamma, and the status says so.
            to_b.proc.kill()
            to_b.proc.wait(timeout=10)
            gone = cluster.wait_for(lambda: (s := status_of(cluster, namespace, "gamma"))
                                    and healthy_condition(s) == "False" and s,
                                    timeout=30, what="Healthy=False once no replica hears a sidecar")
            assert gone["healthyInstances"] == 0 and gone["tools"] == [], gone
        assert proc_a.poll() is None and proc_b.poll() is None


async def test_one_name_in_two_namespaces_is_two_servers(cluster, namespace, tmp_path):
    install_crds(cluster)
    other = f"{namespace[:50]}-b{uuid.uuid4().hex[:4]}"
    cluster.kubectl("create", "namespace", other)
    try:
        for ns in (namespace, other):
            apply_server(cluster, ns, "search")
        tokens = {ns: cluster.token_for(ns, "search", "toolmesh-registry") for ns in (namespace, other)}
        port, registry_proc = kube_registry(cluster, tmp_path, "registry", interval=1)
        registry = f"http://127.0.0.1:{port}"
        with registry_proc as proc, toy_server(tmp_path, "search-a") as (_, url_a), \
                toy_server(tmp_path, "search-b", tools="echo,fail") as (_, url_b):
            wait_until(lambda: port_open(port) or proc.poll() is not None, timeout=30, what="registry")
            beats = {namespace: {"server": "search", "endpoint": url_a, "tools": await list_tools_of(url_a)},
                     other: {"server": "search", "endpoint": url_b, "tools": await list_tools_of(url_b)}}
            async with beating(registry, beats[namespace], secret=tokens[namespace], interval=0.2), \
                    beating(registry, beats[other], secret=tokens[other], interval=0.2):
                a, b = f"{namespace}_search", f"{other}_search"
                expected = sorted([f"{a}__echo", f"{b}__echo", f"{b}__fail"])

                async def listed():
                    names = await tool_names(registry, tokens[namespace])
                    return sorted(n for n in names if "_search__" in n) == expected

                await async_wait_until(listed, timeout=30, what="both namespaces' search under qualified names")
                reader = tokens[namespace]
                tools = {t["name"]: t for t in (await get_json(f"{registry}/v1/tools", reader))["tools"]}
                assert (tools[f"{b}__fail"]["namespace"], tools[f"{b}__fail"]["server"]) == (other, b)
                assert tools[f"{a}__echo"]["description"].startswith(f"[{a}] ")
                servers = {s["name"]: s for s in (await get_json(f"{registry}/v1/servers", reader))["servers"]}
                assert (servers[a]["namespace"], servers[a]["mcpServer"], servers[a]["tools"]) == \
                    (namespace, "search", ["echo"])
                assert "search" not in servers

                from mcp.client import Client

                async with Client(f"{registry}/mcp", mode="legacy") as client:
                    for _ in range(3):  # never round-robined to the other namespace's server
                        result_a = await client.call_tool(f"{a}__echo", {"message": "hi"})
                        result_b = await client.call_tool(f"{b}__echo", {"message": "hi"})
                        assert ([c.text for c in result_a.content], [c.text for c in result_b.content]) == \
                            (["search-a:hi"], ["search-b:hi"])

                def statuses():
                    found = {ns: status_of(cluster, ns, "search") for ns in (namespace, other)}
                    return all(healthy_condition(s) == "True" for s in found.values()) and found

                found = cluster.wait_for(statuses, timeout=30, what="each namespace's MCPServer.status")
                assert [t["name"] for t in found[namespace]["tools"]] == ["echo"]
                assert found[namespace]["toolCount"] == 1
                assert sorted(t["name"] for t in found[other]["tools"]) == ["echo", "fail"]
                assert found[other]["toolCount"] == 2
                assert found[namespace]["tools"][0]["description"] == "Echo a message back, prefixed with search-a"
            assert proc.poll() is None
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)
