"""`toolmesh up` as a user runs it: manifests in a folder, one gateway URL, failures reported, edits applied, Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mcp.client import Client

from helpers import ROOT, TOOLMESH, async_wait_until, free_port, port_open, running, wait_until

TOY = str(ROOT / "tests" / "helpers" / "toy_mcp_server.py")


def server_manifest(name: str, *, priority: int = 0, tools: str = "echo", labels=None) -> dict:
    return {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
            "metadata": {"name": name, "labels": labels or {"team": "demo"}},
            "spec": {"command": [sys.executable, TOY],
                     "args": ["--name", name, "--port", "$(PORT)", "--tools", tools], "priority": priority}}


def write(folder: Path, name: str, *docs: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def output(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


async def gateway_tools(url: str) -> set[str]:
    async with Client(url, mode="legacy") as client:
        return {t.name for t in (await client.list_tools()).tools}


async def call(url: str, tool: str, mode: str = "legacy", **arguments) -> list[str]:
    async with Client(url, mode=mode) as client:
        result = await client.call_tool(tool, arguments)
        assert not result.is_error, result
        return [c.text for c in result.content if c.type == "text"]


def up(folder: Path, tmp_path: Path, port: int, *extra: str):
    log = tmp_path / "up.log"
    cmd = [TOOLMESH, "up", str(folder), "--listen", f"127.0.0.1:{port}", "--heartbeat-interval", "0.2",
           "--start-timeout", "30", "--log-dir", str(tmp_path / "logs"), *extra]
    return running(cmd, log_path=log), log


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_up_runs_every_manifest_behind_one_gateway_and_ctrl_c_stops_it_all(tmp_path, mode):
    folder = tmp_path / "manifests"
    folder.mkdir()
    write(folder, "alpha", server_manifest("alpha", priority=1))
    write(folder, "beta", server_manifest("beta", priority=9))
    port = free_port()
    ctx, log = up(folder, tmp_path, port)
    with ctx as proc:
        wait_until(lambda: "==> running" in output(log) or proc.poll() is not None, timeout=60, what="the table")
        text = output(log)
        assert re.search(r"^alpha\s+streamable-http\s+ready\s+1\s+0\s+http://127\.0\.0\.1:(\d+)/mcp\s+"
                         r"http://127\.0\.0\.1:\1/metrics$", text, re.M), text
        assert f"gateway:  http://127.0.0.1:{port}/mcp" in text
        gateway = f"http://127.0.0.1:{port}/mcp"
        assert await call(gateway, "alpha__echo", mode, message="a") == ["alpha:a"]
        assert await call(gateway, "echo", mode, message="bare") == ["beta:bare"]
        sidecars = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)/metrics$", text, re.M)]
        assert len(sidecars) == 2 and all(port_open(p) for p in sidecars)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "==> stopped" in output(log)
        assert not any(port_open(p) for p in [port, *sidecars])


async def test_a_server_that_fails_is_reported_with_its_stderr_while_the_rest_run(tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    write(folder, "alpha", server_manifest("alpha"))
    broken = server_manifest("broken")
    broken["spec"]["command"] = [sys.executable, "-c", "import sys; sys.exit('boom: missing DATABASE_URL')"]
    broken["spec"]["args"] = []
    write(folder, "broken", broken)
    missing = server_manifest("missing")
    missing["spec"].update(transport="stdio", command=["no-such-mcp-server"], args=[])
    write(folder, "missing", missing)
    port = free_port()
    ctx, log = up(folder, tmp_path, port)
    with ctx as proc:
        wait_until(lambda: "==> running" in output(log) or proc.poll() is not None, timeout=60, what="the table")
        text = output(log)
        assert re.search(r"^broken\s+streamable-http\s+failed\s+0\s+0\s+-\s+-$", text, re.M), text
        assert "broken failed: exited with status 1 before listening" in text
        assert "boom: missing DATABASE_URL" in text
        assert "missing failed: command not found: no-such-mcp-server" in text
        assert await call(f"http://127.0.0.1:{port}/mcp", "alpha__echo", message="ok") == ["alpha:ok"]


async def test_edited_manifests_are_applied_while_running(tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    write(folder, "alpha", server_manifest("alpha", priority=1))
    port = free_port()
    gateway = f"http://127.0.0.1:{port}/mcp"
    ctx, log = up(folder, tmp_path, port)
    with ctx as proc:
        wait_until(lambda: "==> running" in output(log) or proc.poll() is not None, timeout=60, what="the table")
        assert await gateway_tools(gateway) == {"toolmesh__run_workflow", "alpha__echo"}
        # A new server appears ...
        write(folder, "beta", server_manifest("beta", priority=5, tools="echo,slow"))

        async def beta_listed():
            return await gateway_tools(gateway) == {"toolmesh__run_workflow", "alpha__echo", "beta__echo", "beta__slow"}

        await async_wait_until(beta_listed, timeout=30, what="beta to join the gateway")
        assert await call(gateway, "echo", message="x") == ["beta:x"]
        # ... a changed priority takes the bare name back ...
        write(folder, "alpha", server_manifest("alpha", priority=10))

        async def alpha_first():
            return await call(gateway, "echo", message="x") == ["alpha:x"]

        await async_wait_until(alpha_first, timeout=30, what="alpha's new priority")
        # ... and a deleted manifest stops its server.
        (folder / "beta.yaml").unlink()

        async def beta_gone():
            return await gateway_tools(gateway) == {"toolmesh__run_workflow", "alpha__echo"}

        await async_wait_until(beta_gone, timeout=30, what="beta to leave")
        assert "beta: removed from the manifests, stopping" in output(log)


async def test_a_policy_selecting_a_server_is_enforced_and_reloaded(tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    write(folder, "alpha", server_manifest("alpha"))
    port = free_port()
    gateway = f"http://127.0.0.1:{port}/mcp"
    limited = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": "tight"},
               "spec": {"selector": {"matchLabels": {"team": "demo"}},
                        "rateLimit": {"requestsPerSecond": 0.01, "burst": 3}}}
    write(folder, "policy", limited)
    ctx, log = up(folder, tmp_path, port)
    with ctx as proc:
        wait_until(lambda: "==> running" in output(log) or proc.poll() is not None, timeout=60, what="the table")
        async with Client(gateway, mode="legacy") as client:
            assert not (await client.call_tool("alpha__echo", {"message": "1"})).is_error
            with pytest.raises(Exception, match="(?i)rate limit"):
                for attempt in range(5):  # the burst of 3 also covers the gateway's handshake with the sidecar
                    await client.call_tool("alpha__echo", {"message": str(attempt)})
        limited["spec"]["rateLimit"] = {"requestsPerSecond": 1000, "burst": 1000}
        write(folder, "policy", limited)
        wait_until(lambda: "alpha: policy updated (tight)" in output(log), timeout=30, what="the policy update")

        async def allowed():
            try:
                return bool(await call(gateway, "alpha__echo", message="again"))
            except Exception:  # noqa: BLE001 - still limited until the sidecar re-reads its file
                return False

        await async_wait_until(allowed, timeout=30, what="the relaxed limit to apply")


def test_bad_manifests_are_bad_usage(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([TOOLMESH, "up", str(empty)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no MCPServer in" in done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"kind": "MCPServer", "metadata": {"name": "x"}, "spec": {"command": ["x"], "port": 0}}))
    done = subprocess.run([TOOLMESH, "up", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "MCPServer x" in done.stderr and "port" in done.stderr


async def test_a_users_server_imports_the_module_beside_it(tmp_path):
    """`python server.py` puts server.py's folder on sys.path: toolmesh up must not take that away (PYTHONSAFEPATH)."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "helper.py").write_text("GREETING = 'from the module beside the script'\n")
    (app / "server.py").write_text(
        "import runpy, sys\n"
        "import helper  # beside this file\n"
        f"sys.argv = [{TOY!r}, *sys.argv[1:]]\n"
        f"runpy.run_path({TOY!r}, run_name='__main__')\n")
    folder = tmp_path / "manifests"
    folder.mkdir()
    manifest = server_manifest("mine")
    manifest["spec"]["command"] = [sys.executable, str(app / "server.py")]
    write(folder, "mine", manifest)
    port = free_port()
    ctx, log = up(folder, tmp_path, port)
    with ctx as proc:
        wait_until(lambda: "==> running" in output(log) or proc.poll() is not None, timeout=60, what="the table")
        assert re.search(r"^mine\s+streamable-http\s+ready\s", output(log), re.M), output(log)
        assert await call(f"http://127.0.0.1:{port}/mcp", "mine__echo", message="hi") == ["mine:hi"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
