"""`toolmesh up` keeps what it runs alive: a crashed server or sidecar is restarted, a port taken from under it is
replaced, and a failed server starts again when its manifest is touched."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from pathlib import Path

import yaml

from helpers import ROOT, TOOLMESH, async_wait_until, free_port, running, wait_until

TOY = str(ROOT / "tests" / "helpers" / "toy_mcp_server.py")
RACE = str(ROOT / "tests" / "helpers" / "port_race_server.py")


def manifest(name: str, command: list[str]) -> dict:
    return {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
            "metadata": {"name": name, "labels": {"team": "demo"}}, "spec": {"command": command, "args": []}}


def output(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def up(folder: Path, tmp_path: Path, port: int):
    log = tmp_path / "up.log"
    cmd = [TOOLMESH, "up", str(folder), "--listen", f"127.0.0.1:{port}", "--heartbeat-interval", "0.2",
           "--start-timeout", "30", "--log-dir", str(tmp_path / "logs")]
    return running(cmd, log_path=log), log


def pids_with_argument(argument: str) -> list[int]:
    """Processes whose command line has exactly this argument (a path unique to the test)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if argument in (proc / "cmdline").read_bytes().decode(errors="replace").split("\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


async def gateway_echo(gateway: str, tool: str, message: str) -> bool:
    from mcp.client import Client

    try:
        async with Client(gateway, mode="legacy") as client:
            result = await client.call_tool(tool, {"message": message})
    except Exception:  # noqa: BLE001 - not back yet
        return False
    return not result.is_error and [c.text for c in result.content] == [f"{tool.split('__')[0]}:{message}"]


async def test_a_killed_http_server_and_a_killed_sidecar_are_restarted(tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    # The server writes its pid where the test finds it, then becomes the toy server.
    command = ["sh", "-c", f'echo $$ > server.pid; exec "{sys.executable}" "{TOY}" --name alpha --port "$PORT"']
    (folder / "alpha.yaml").write_text(yaml.safe_dump(manifest("alpha", command)))
    port = free_port()
    gateway = f"http://127.0.0.1:{port}/mcp"
    ctx, log = up(folder, tmp_path, port)
    with ctx as proc:
        wait_until(lambda: "==> running" in output(log) or proc.poll() is not None, timeout=60, what="the table")
        assert re.search(r"^alpha\s+streamable-http\s+ready\s+1\s+0\s", output(log), re.M), output(log)
        assert await gateway_echo(gateway, "alpha__echo", "before")

        os.kill(int((folder / "server.pid").read_text()), signal.SIGKILL)
        wait_until(lambda: "alpha: server exited with signal SIGKILL; restarting in" in output(log),
                   timeout=30, what="the crash to be reported")
        wait_until(lambda: re.search(r"^alpha\s+streamable-http\s+ready\s+1\s+1\s", output(log), re.M),
                   timeout=60, what="the restarted server in the table")
        await async_wait_until(lambda: gateway_echo(gateway, "alpha__echo", "after"), timeout=30,
                               what="a call through the gateway to work again")

        sidecar, = pids_with_argument(str(tmp_path / "logs" / "alpha.policy.yaml"))
        os.kill(sidecar, signal.SIGKILL)
        wait_until(lambda: "alpha: sidecar exited with signal SIGKILL; restarting in" in output(log),
                   timeout=30, what="the sidecar's crash to be reported")
        wait_until(lambda: re.search(r"^alpha\s+streamable-http\s+ready\s+1\s+2\s", output(log), re.M),
                   timeout=60, what="the restarted sidecar in the table")
        await async_wait_until(lambda: gateway_echo(gateway, "alpha__echo", "again"), timeout=30,
                               what="a call through the gateway after the sidecar's restart")


async def test_a_port_taken_between_pick_and_bind_does_not_fail_toolmesh_up(tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "alpha.yaml").write_text(yaml.safe_dump(manifest("alpha", [sys.executable, RACE, "--name", "alpha"])))
    port = free_port()
    ctx, log = up(folder, tmp_path, port)
    with ctx as proc, socket.socket() as thief:
        wanted = folder / "port.wanted"
        wait_until(lambda: wanted.exists() and wanted.read_text() or proc.poll() is not None, timeout=60,
                   what="the server to be given its port")
        taken = int(wanted.read_text())
        # Another program, like any server, binds with SO_REUSEADDR and listens on the port first.
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief.bind(("127.0.0.1", taken))
        thief.listen()
        (folder / "port.taken").write_text("")
        wait_until(lambda: "==> running" in output(log) or proc.poll() is not None, timeout=90, what="the table")
        text = output(log)
        assert f"alpha: port {taken} for the server: another process listens on it; trying another port" in text
        assert re.search(r"^alpha\s+streamable-http\s+ready\s+1\s+0\s", text, re.M), text
        assert await gateway_echo(f"http://127.0.0.1:{port}/mcp", "alpha__echo", "ok")


async def test_a_failed_server_starts_again_when_its_manifest_is_touched(tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    # Fails until the file it needs exists, as a server missing its configuration does.
    command = ["sh", "-c", f'test -e ready || {{ echo "no configuration yet" >&2; exit 3; }}; '
                           f'exec "{sys.executable}" "{TOY}" --name alpha --port "$PORT"']
    path = folder / "alpha.yaml"
    path.write_text(yaml.safe_dump(manifest("alpha", command)))
    port = free_port()
    ctx, log = up(folder, tmp_path, port)
    with ctx as proc:
        wait_until(lambda: "==> running" in output(log) or proc.poll() is not None, timeout=60, what="the table")
        assert "alpha failed: exited with status 3 before listening" in output(log)
        (folder / "ready").write_text("")
        os.utime(path)
        wait_until(lambda: "alpha: manifest touched, restarting" in output(log), timeout=30, what="the touch")
        wait_until(lambda: re.search(r"^alpha\s+streamable-http\s+ready\s+1\s", output(log), re.M),
                   timeout=60, what="alpha to start")
        assert await gateway_echo(f"http://127.0.0.1:{port}/mcp", "alpha__echo", "ok")


async def test_a_stdio_server_restarted_by_its_sidecar_is_reported(tmp_path):
    from mcp.client import Client

    folder = tmp_path / "manifests"
    folder.mkdir()
    # mcp-server-time (PyPI) over stdio, writing its pid where the test finds it.
    command = ["sh", "-c", "echo $$ > server.pid; exec mcp-server-time --local-timezone UTC"]
    doc = manifest("clock", command)
    doc["spec"]["transport"] = "stdio"
    (folder / "clock.yaml").write_text(yaml.safe_dump(doc))
    port = free_port()
    gateway = f"http://127.0.0.1:{port}/mcp"
    ctx, log = up(folder, tmp_path, port)
    with ctx as proc:
        wait_until(lambda: "==> running" in output(log) or proc.poll() is not None, timeout=60, what="the table")
        assert re.search(r"^clock\s+stdio\s+ready\s+2\s+0\s", output(log), re.M), output(log)
        first = int((folder / "server.pid").read_text())
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: "==> clock: stdio upstream exited (code -9); its sidecar restarts it" in output(log),
                   timeout=30, what="the stdio server's exit to be reported")

        async def converts() -> bool:
            try:
                async with Client(gateway, mode="legacy") as client:
                    result = await client.call_tool("clock__convert_time", {
                        "source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"})
                    return not result.is_error and "21:00" in result.content[0].text
            except Exception:  # noqa: BLE001 - not back yet
                return False

        await async_wait_until(converts, timeout=30, what="a call to the restarted stdio server")
        assert int((folder / "server.pid").read_text()) != first
