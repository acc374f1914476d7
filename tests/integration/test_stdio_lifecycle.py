"""The stdio bridge's life cycle: crashes and restarts, garbage output, failed starts, attaching through FIFOs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys

import orjson
import pytest

from helpers import async_wait_until
from helpers.stdio_servers import STDIO_TOOLS, UpstreamClient, text_of
from toolmesh.sidecar.errors import UpstreamTimeout, UpstreamUnavailable
from toolmesh.sidecar.transports.stdio import StdioUpstream

pytestmark = pytest.mark.timeout(60)

FAST_RESTART = (0.05, 0.5)


@pytest.fixture
async def bridge():
    upstream = StdioUpstream(STDIO_TOOLS, restart_backoff=FAST_RESTART, start_timeout=20)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


async def test_a_crash_fails_every_call_in_flight_then_the_child_restarts(bridge, caplog):
    caplog.set_level(logging.INFO, logger="toolmesh.sidecar.stdio")
    waiting, crashing, later = UpstreamClient(bridge), UpstreamClient(bridge), UpstreamClient(bridge)
    for client in (waiting, crashing, later):
        await client.initialize()
    first_pid = text_of(await later.call_tool("whoami"))
    stuck = asyncio.create_task(waiting.call_tool("wait_forever", {"label": "a"}))
    await async_wait_until(lambda: _true(bridge.mux.in_flight == 1), what="the waiting call in flight")

    with pytest.raises(UpstreamUnavailable) as crashed:
        await crashing.call_tool("crash", {"code": 3})
    with pytest.raises(UpstreamUnavailable) as bystander:
        await stuck
    for failure in (crashed.value, bystander.value):
        assert failure.code == -32001 and failure.message == "upstream exited"
        assert failure.data["exitCode"] == 3
        assert any("about to crash with code 3" in line for line in failure.data["stderr"])

    await async_wait_until(bridge.probe, timeout=15, what="the restarted child to answer a ping")
    # The sessions outlive the child: the same session calls the new one.
    assert text_of(await later.call_tool("echo", {"text": "again"})) == "again"
    assert text_of(await later.call_tool("whoami")) != first_pid
    assert bridge.restarts == 1
    assert "about to crash with code 3" in caplog.text


async def test_garbage_and_oversized_lines_are_skipped_and_the_bridge_keeps_serving(caplog):
    caplog.set_level(logging.WARNING)
    upstream = StdioUpstream(STDIO_TOOLS, max_line_bytes=1 << 20)
    await upstream.start()
    try:
        client = UpstreamClient(upstream)
        await client.initialize()
        answer = await client.call_tool("garbage", {"oversized_bytes": 3 << 20})
        assert text_of(answer) == "still here"
        assert text_of(await client.call_tool("echo", {"text": "ok"})) == "ok"
        assert upstream.restarts == 0
        assert "not JSON" in caplog.text and "longer than 1048576 bytes" in caplog.text
    finally:
        await upstream.close()


async def test_garbage_before_the_handshake_does_not_stop_the_start():
    script = ("printf 'starting up\\n{\"half\":\\n'; head -c 3000000 /dev/zero | tr '\\0' x; echo; "
              f"exec {' '.join(STDIO_TOOLS)}")
    upstream = StdioUpstream(["sh", "-c", script], max_line_bytes=1 << 20)
    await upstream.start()
    try:
        client = UpstreamClient(upstream)
        await client.initialize()
        assert text_of(await client.call_tool("echo", {"text": "fine"})) == "fine"
    finally:
        await upstream.close()


async def test_a_command_that_cannot_start_fails_start_with_its_stderr():
    upstream = StdioUpstream(["sh", "-c", "echo 'config missing' >&2; exit 4"], restart_backoff=FAST_RESTART)
    with pytest.raises(UpstreamUnavailable) as failed:
        await upstream.start()
    assert failed.value.data["exitCode"] == 4
    assert failed.value.data["stderr"] == ["config missing"]
    assert not await upstream.probe()


async def test_a_missing_executable_fails_start():
    upstream = StdioUpstream(["/nonexistent/mcp-server"])
    with pytest.raises(UpstreamUnavailable):
        await upstream.start()


async def test_attached_through_fifos_like_a_kubernetes_pod(tmp_path):
    upstream = StdioUpstream.attach(tmp_path, restart_backoff=FAST_RESTART)
    await upstream.start()  # returns before the server container exists
    server_cmd = f"exec {' '.join(STDIO_TOOLS)} <in.fifo >out.fifo"
    children: list[subprocess.Popen] = []
    try:
        assert not await upstream.probe()
        assert (tmp_path / "in.fifo").exists() and (tmp_path / "out.fifo").exists()
        children.append(subprocess.Popen(["sh", "-c", server_cmd], cwd=tmp_path, start_new_session=True,
                                         stderr=subprocess.DEVNULL))
        await async_wait_until(upstream.probe, timeout=20, what="the bridge to reach the server through FIFOs")
        client = UpstreamClient(upstream)
        await client.initialize()
        first_pid = text_of(await client.call_tool("whoami"))
        assert int(first_pid) == children[0].pid  # sh exec'd the server
        # One process serves one era: a 2026-07-28 request reaches it without the envelope, answered in that era.
        modern = await upstream.post(orjson.dumps({"jsonrpc": "2.0", "id": "m", "method": "tools/list", "params": {
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities": {}}}}),
            {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"})
        listed = orjson.loads(modern.body)["result"]
        assert listed["resultType"] == "complete" and listed["ttlMs"] == 0
        assert "whoami" in {tool["name"] for tool in listed["tools"]}

        stuck = asyncio.create_task(client.call_tool("wait_forever", {"label": "pod"}))
        await async_wait_until(lambda: _true(upstream.mux.in_flight == 1), what="the call in flight")
        os.killpg(children[0].pid, signal.SIGKILL)  # the container dies
        with pytest.raises(UpstreamUnavailable) as failed:
            await stuck
        assert failed.value.message == "upstream exited"

        # The kubelet restarts the container: same FIFOs, new process.
        children.append(subprocess.Popen(["sh", "-c", server_cmd], cwd=tmp_path, start_new_session=True,
                                         stderr=subprocess.DEVNULL))
        await async_wait_until(upstream.probe, timeout=20, what="the bridge to re-attach")
        assert text_of(await client.call_tool("whoami")) == str(children[1].pid)
    finally:
        await upstream.close()
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=10)


def test_a_stdio_upstream_needs_a_command_or_a_fifo_directory(tmp_path):
    with pytest.raises(ValueError):
        StdioUpstream([])
    with pytest.raises(ValueError):
        StdioUpstream(["x"], fifo_dir=tmp_path)
    assert StdioUpstream("mcp-server-time --local-timezone UTC").command == [
        "mcp-server-time", "--local-timezone", "UTC"]



async def _true(value: bool) -> bool:
    return value


async def test_a_silent_call_times_out_and_is_cancelled_but_progress_keeps_one_alive(caplog):
    caplog.set_level(logging.INFO, logger="toolmesh.sidecar.stdio")
    upstream = StdioUpstream(STDIO_TOOLS, timeout=2.0)
    await upstream.start()
    try:
        client = UpstreamClient(upstream)
        await client.initialize()
        with pytest.raises(UpstreamTimeout):
            await client.call_tool("wait_forever", {"label": "silent"})
        await async_wait_until(lambda: _true("cancelled silent" in caplog.text), what="the child to cancel the call")
        # 14 × 0.2 s is longer than the timeout, but every progress notification shows the call is alive.
        events: list[dict] = []
        answer = await client.request("tools/call", {"name": "trickle", "arguments": {"steps": 14, "interval": 0.2},
                                                     "_meta": {"progressToken": 1}}, events=events)
        assert text_of(answer) == "trickled 14" and len(events) == 14
    finally:
        await upstream.close()


DEAF_SERVER = """
import json, sys, time
request = json.loads(sys.stdin.readline())
print(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "serverInfo": {"name": "deaf", "version": "1"}}}), flush=True)
time.sleep(60)  # never reads its input again
"""


async def test_a_child_that_stops_reading_its_input_times_out_instead_of_hanging_callers():
    upstream = StdioUpstream([sys.executable, "-c", DEAF_SERVER], timeout=1.0)
    await upstream.start()
    try:
        client = UpstreamClient(upstream)
        await client.initialize()
        with pytest.raises(UpstreamTimeout):
            await client.call_tool("echo", {"text": "x" * 400_000})
    finally:
        await upstream.close()
