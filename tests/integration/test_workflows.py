"""Delegation workflows on real SDK agent servers: parallel diamonds, failures, slots and the gateway tool."""

from __future__ import annotations

import aiohttp
from mcp.client import Client

from helpers.registry_procs import beating, list_tools_of, registry_process, toy_server


async def agent_beat(name: str, url: str, capabilities=("work",), max_concurrent: int = 3):
    return {"server": name, "instance": f"{name}-0", "endpoint": url, "tools": await list_tools_of(url),
            "capabilities": list(capabilities), "maxConcurrent": max_concurrent}


async def run_workflow(registry: str, workflow: dict, *, wait: bool = True) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{registry}/v1/workflows" + ("?wait=true" if wait else ""), json=workflow) as resp:
            return resp.status, await resp.json()


def task(task_id: str, depends=(), **arguments):
    return {"id": task_id, "capability": "work", "dependsOn": list(depends), "timeoutSeconds": 20,
            "arguments": {"task": task_id, **arguments}}


async def test_a_diamond_runs_its_middle_in_parallel_and_passes_results_as_context(tmp_path):
    with registry_process(tmp_path) as registry, toy_server(tmp_path, "agent", "task") as (_, url):
        async with beating(registry, await agent_beat("agent", url)):
            # b and c only finish once both are running at the same time (the agent makes them meet).
            status, run = await run_workflow(registry, {"tasks": [
                task("d", ["b", "c"]), task("b", ["a"], meet="bc"), task("c", ["a"], meet="bc"), task("a")]})
            assert status == 200 and run["state"] == "succeeded", run
            t = run["tasks"]
            assert t["a"]["startedSeq"] == 0 and t["a"]["finishedSeq"] == 0
            assert {t["b"]["startedSeq"], t["c"]["startedSeq"]} == {1, 2}
            assert {t["b"]["finishedSeq"], t["c"]["finishedSeq"]} == {1, 2}
            assert t["d"]["startedSeq"] == 3 and t["d"]["finishedSeq"] == 3
            assert t["b"]["result"]["context"] == {"a": t["a"]["result"]}
            assert t["d"]["result"]["context"] == {"b": t["b"]["result"], "c": t["c"]["result"]}
            assert t["a"]["result"]["context"] is None and t["d"]["server"] == "agent"


async def test_a_failing_task_fails_its_dependants_with_the_reason_and_spares_the_rest(tmp_path):
    with registry_process(tmp_path) as registry, toy_server(tmp_path, "agent", "task") as (_, url):
        async with beating(registry, await agent_beat("agent", url)):
            status, run = await run_workflow(registry, {"tasks": [
                task("a", fail=True), task("b", ["a"]), task("c", ["b"]), task("free")]})
            assert status == 200 and run["state"] == "failed"
            t = run["tasks"]
            assert t["a"]["state"] == "failed" and "failed on purpose" in t["a"]["error"]
            assert t["b"]["state"] == "failed" and t["b"]["error"].startswith("dependency a failed: ")
            assert t["c"]["error"].startswith("dependency b failed: dependency a failed")
            assert t["b"]["startedSeq"] is None and t["c"]["startedSeq"] is None
            assert t["free"]["state"] == "succeeded"


async def test_cycles_and_unknown_dependencies_are_rejected_before_anything_runs(tmp_path):
    with registry_process(tmp_path) as registry:
        status, body = await run_workflow(registry, {"tasks": [task("a", ["b"]), task("b", ["a"]), task("c")]})
        assert status == 400 and "cycle among: a, b" in body["error"]
        status, body = await run_workflow(registry, {"tasks": [task("a", ["ghost"])]})
        assert status == 400 and "unknown task(s): ghost" in body["error"]
        status, body = await run_workflow(registry, {"tasks": [{"id": "x"}]})
        assert status == 400 and "exactly one of capability and server" in body["error"]


async def test_max_concurrent_holds_under_load(tmp_path):
    with registry_process(tmp_path) as registry, toy_server(tmp_path, "agent", "task") as (_, url):
        async with beating(registry, await agent_beat("agent", url, max_concurrent=2)):
            # Every task waits for a partner, so two run at once whenever the scheduler allows; never three.
            status, run = await run_workflow(registry, {"tasks": [task(f"t{i}", meet="pairs") for i in range(8)]})
            assert status == 200 and run["state"] == "succeeded", run
            assert max(t["result"]["peak"] for t in run["tasks"].values()) == 2


async def test_tasks_go_to_the_least_loaded_server_and_wait_for_a_slot(tmp_path):
    with (registry_process(tmp_path) as registry,
          toy_server(tmp_path, "one", "task") as (_, one), toy_server(tmp_path, "two", "task") as (_, two)):
        async with beating(registry, await agent_beat("one", one, max_concurrent=1)), \
                beating(registry, await agent_beat("two", two, max_concurrent=1)):
            status, run = await run_workflow(registry, {"tasks": [task("x"), task("y"), task("z")]})
            assert status == 200 and run["state"] == "succeeded"
            servers = [run["tasks"][i]["server"] for i in ("x", "y", "z")]
            assert sorted(servers[:2]) == ["one", "two"] and servers[2] in ("one", "two")
            status, run = await run_workflow(registry, {"tasks": [
                {"id": "lost", "capability": "nobody", "timeoutSeconds": 0.3}]})
            assert run["tasks"]["lost"]["error"] == "no free healthy a server with capability 'nobody' within 0.3s"


async def test_the_gateway_tool_runs_a_workflow_with_progress_per_task(tmp_path):
    with registry_process(tmp_path) as registry, toy_server(tmp_path, "agent", "task") as (_, url):
        async with beating(registry, await agent_beat("agent", url)):
            async with Client(f"{registry}/mcp", mode="legacy") as client:
                names = [t.name for t in (await client.list_tools()).tools]
                assert names[0] == "toolmesh__run_workflow" and "agent__execute_task" in names
                progress = []

                async def on_progress(value, total, message):
                    progress.append((value, total, message))

                result = await client.call_tool("toolmesh__run_workflow",
                                                 {"tasks": [task("a"), task("b", ["a"])]}, progress_callback=on_progress)
                assert not result.is_error
                assert result.structured_content["state"] == "succeeded"
                assert progress == [(1, 2, "a succeeded"), (2, 2, "b succeeded")]
                bad = await client.call_tool("toolmesh__run_workflow", {"tasks": [task("a", ["a"])]})
                assert bad.is_error and "cycle" in bad.content[0].text


async def test_a_started_workflow_can_be_followed_by_id(tmp_path):
    with registry_process(tmp_path) as registry, toy_server(tmp_path, "agent", "task") as (_, url):
        async with beating(registry, await agent_beat("agent", url)):
            status, run = await run_workflow(registry, {"tasks": [task("only")]}, wait=False)
            assert status == 202 and run["state"] == "running"
            async with aiohttp.ClientSession() as http:
                from helpers import async_wait_until

                async def finished():
                    async with http.get(f"{registry}/v1/workflows/{run['id']}") as resp:
                        body = await resp.json()
                        return body if body["state"] != "running" else None

                final = await async_wait_until(finished, timeout=10, what="the workflow to finish")
                assert final["state"] == "succeeded" and final["tasks"]["only"]["result"]["task"] == "only"
                async with http.get(f"{registry}/v1/workflows/nope") as resp:
                    assert resp.status == 404
