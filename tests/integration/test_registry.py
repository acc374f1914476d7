"""The registry process: authenticated heartbeats build the catalogue, missed ones empty it."""

from __future__ import annotations

import time

from helpers import async_wait_until
from helpers.registry_procs import beating, get_json, post_heartbeat, registry_process

TOOLS = [
    {"name": "get_time", "description": "Current time", "inputSchema": {"type": "object"},
     "annotations": {"readOnlyHint": True}},
    {"name": "convert", "inputSchema": {"type": "object", "properties": {"tz": {"type": "string"}}}},
]


def beat(server: str = "clock", endpoint: str = "http://127.0.0.1:1/mcp", **extra):
    return {"server": server, "instance": f"{server}-0", "endpoint": endpoint, "health": "ok", "tools": TOOLS, **extra}


async def test_heartbeats_need_the_shared_secret(tmp_path):
    with registry_process(tmp_path, secret="s3cret") as registry:
        assert (await post_heartbeat(registry, beat()))[0] == 401
        assert (await post_heartbeat(registry, beat(), secret="wrong"))[0] == 401
        assert (await get_json(f"{registry}/v1/tools"))["tools"] == []
        status, body = await post_heartbeat(registry, beat(), secret="s3cret")
        assert status == 200 and body["interval"] == 1.0
        assert [t["name"] for t in (await get_json(f"{registry}/v1/tools"))["tools"]] == ["clock__get_time", "clock__convert"]


async def test_malformed_heartbeats_are_refused_with_the_reason(tmp_path):
    with registry_process(tmp_path) as registry:
        status, body = await post_heartbeat(registry, {"server": "a__b", "endpoint": "http://x/mcp"})
        assert status == 400 and "__" in body["error"]
        status, body = await post_heartbeat(registry, {"server": "a", "endpoint": "ftp://x"})
        assert status == 400 and "endpoint" in body["error"]
        status, body = await post_heartbeat(registry, {"server": "a", "endpoint": "http://x/mcp", "tools": [{"x": 1}]})
        assert status == 400 and "tools" in body["error"]


async def test_catalogue_lists_schemas_annotations_and_traits(tmp_path):
    with registry_process(tmp_path) as registry:
        async with beating(registry, beat(priority=7, capabilities=["time"], maxConcurrent=2)):
            tools = (await get_json(f"{registry}/v1/tools"))["tools"]
            first = tools[0]
            assert first["name"] == "clock__get_time" and first["server"] == "clock" and first["tool"] == "get_time"
            assert first["description"] == "[clock] Current time"
            assert first["annotations"] == {"readOnlyHint": True}
            assert tools[1]["inputSchema"]["properties"] == {"tz": {"type": "string"}}
            (server,) = (await get_json(f"{registry}/v1/servers"))["servers"]
            assert server["healthy"] and server["priority"] == 7 and server["capabilities"] == ["time"]
            assert server["maxConcurrent"] == 2 and server["tools"] == ["get_time", "convert"]
            assert server["instances"][0]["endpoint"] == "http://127.0.0.1:1/mcp"


async def test_an_instance_missing_three_heartbeats_leaves_the_catalogue(tmp_path):
    with registry_process(tmp_path, interval=0.2, missed=3) as registry:
        async with beating(registry, beat("keeps")):
            async with beating(registry, beat("stops")):
                assert len((await get_json(f"{registry}/v1/tools"))["tools"]) == 4
            stopped = time.monotonic()

            async def gone():
                names = [t["name"] for t in (await get_json(f"{registry}/v1/tools"))["tools"]]
                return names == ["keeps__get_time", "keeps__convert"]

            await async_wait_until(gone, timeout=5, what="the silent instance's tools to leave")
            # 3 missed beats of 0.2 s: gone soon after the deadline.
            assert time.monotonic() - stopped < 3
            servers = {s["name"]: s for s in (await get_json(f"{registry}/v1/servers"))["servers"]}
            assert servers["keeps"]["healthy"] and not servers["stops"]["healthy"]


async def test_a_leaving_sidecar_takes_its_tools_at_once_and_a_new_beat_brings_them_back(tmp_path):
    with registry_process(tmp_path, interval=10) as registry:
        assert (await post_heartbeat(registry, beat()))[0] == 200
        assert len((await get_json(f"{registry}/v1/tools"))["tools"]) == 2
        assert (await post_heartbeat(registry, {**beat(), "leaving": True}))[0] == 200
        assert (await get_json(f"{registry}/v1/tools"))["tools"] == []
        assert (await post_heartbeat(registry, beat(health="upstream down")))[0] == 200
        assert (await get_json(f"{registry}/v1/tools"))["tools"] == []
        assert (await post_heartbeat(registry, beat()))[0] == 200
        assert len((await get_json(f"{registry}/v1/tools"))["tools"]) == 2


async def test_declared_mcpserver_specs_outrank_what_heartbeats_say(tmp_path):
    manifest = tmp_path / "clock.yaml"
    manifest.write_text("apiVersion: toolmesh.io/v1alpha1\nkind: MCPServer\nmetadata: {name: clock}\n"
                        "spec: {command: [x], priority: 3, capabilities: [time], maxConcurrent: 5}\n")
    with registry_process(tmp_path, extra=["--manifests", str(manifest)]) as registry:
        (declared,) = (await get_json(f"{registry}/v1/servers"))["servers"]
        assert not declared["healthy"] and declared["instances"] == []
        assert (await post_heartbeat(registry, beat(priority=99, capabilities=["other"])))[0] == 200
        (server,) = (await get_json(f"{registry}/v1/servers"))["servers"]
        assert server["healthy"] and (server["priority"], server["capabilities"], server["maxConcurrent"]) == (3, ["time"], 5)
