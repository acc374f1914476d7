"""The example agents under `toolmesh up`: the example workflow runs research in parallel, then writes and reviews."""

from __future__ import annotations

import json

import aiohttp
from mcp.client import Client

from helpers import ROOT, TOOLMESH, free_port, running, wait_until

AGENTS = ROOT / "examples" / "agents"


async def test_the_example_workflow_runs_on_the_example_agents(tmp_path):
    port = free_port()
    log = tmp_path / "up.log"
    cmd = [TOOLMESH, "up", str(AGENTS), "--listen", f"127.0.0.1:{port}", "--log-dir", str(tmp_path / "logs")]
    with running(cmd, log_path=log) as proc:
        wait_until(lambda: "==> running" in log.read_text() or proc.poll() is not None, timeout=90, what="agents up")
        assert log.read_text().count(" ready ") == 3, log.read_text()
        workflow = json.loads((AGENTS / "workflow.json").read_text())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/v1/workflows?wait=true", json=workflow) as resp:
                assert resp.status == 200
                run = await resp.json()
        assert run["state"] == "succeeded", run
        tasks = run["tasks"]
        # The two research tasks run side by side (researcher takes 2 at a time); writing waits for both.
        assert {tasks["market"]["startedSeq"], tasks["risks"]["startedSeq"]} == {0, 1}
        assert tasks["draft"]["startedSeq"] == 2 and tasks["review"]["startedSeq"] == 3
        assert tasks["market"]["server"] == "researcher" and tasks["draft"]["server"] == "writer"
        assert tasks["market"]["result"]["terms"] == ["gateways", "market", "mcp"]
        assert tasks["draft"]["result"]["sources"] == 2
        assert "security, servers, tool" in tasks["draft"]["result"]["draft"]
        assert tasks["review"]["result"] == {"role": "reviewer", "approved": True,
                                             "words": tasks["review"]["result"]["words"], "notes": "ready to publish"}
        # The same workflow as one tool call through the gateway, with progress per finished task.
        progress = []

        async def on_progress(value, total, message):
            progress.append(message)

        async with Client(f"http://127.0.0.1:{port}/mcp", mode="auto") as client:
            result = await client.call_tool("toolmesh__run_workflow", workflow, progress_callback=on_progress)
        assert not result.is_error and result.structured_content["state"] == "succeeded"
        assert sorted(progress[:2]) == ["market succeeded", "risks succeeded"]
        assert progress[2:] == ["draft succeeded", "review succeeded"]
