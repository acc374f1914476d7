"""Stdio and legacy SSE servers behind the real `toolmesh sidecar`, spoken to by the official SDK client."""

from __future__ import annotations

import asyncio
import shlex

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import CreateMessageResult, ElicitResult, TextContent

from helpers import free_port, port_open, running, wait_until
from helpers.stateless_calls import STATELESS_ERA
from helpers.sidecar import sidecar
from helpers.stdio_servers import EVERYTHING_SERVER, STDIO_TOOLS, TIME_SERVER, sse_tools_server

pytestmark = pytest.mark.timeout(90)


def text_of(result) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def answer_sampling(ctx, params):
    return CreateMessageResult(role="assistant", model="test-model",
                               content=TextContent(type="text", text="sampled " + params.messages[0].content.text))


@pytest.fixture(scope="module")
def tools_sidecar(tmp_path_factory):
    with sidecar(["--upstream-command", shlex.join(STDIO_TOOLS)], tmp_path_factory.mktemp("stdio")) as sc:
        yield sc


async def test_sdk_clients_share_one_stdio_child_through_the_sidecar(tools_sidecar):
    async def session(index: int) -> tuple[str, str]:
        async with Client(tools_sidecar.url, mode="legacy") as client:
            echoed = text_of(await client.call_tool("echo", {"text": f"client {index}"}))
            return echoed, text_of(await client.call_tool("whoami", {}))

    results = await asyncio.gather(*(session(i) for i in range(6)))
    assert [echoed for echoed, _ in results] == [f"client {i}" for i in range(6)]
    assert len({pid for _, pid in results}) == 1


@pytest.mark.parametrize("mode", [STATELESS_ERA, "auto"])
async def test_stateless_era_clients_reach_a_stdio_server(tools_sidecar, mode):
    seen = []

    async def on_progress(progress, total, message):
        seen.append(progress)

    async with Client(tools_sidecar.url, mode=mode) as client:
        assert client.protocol_version == STATELESS_ERA  # auto mode finds the era the server serves
        assert "echo" in {t.name for t in (await client.list_tools()).tools}
        assert text_of(await client.call_tool("echo", {"text": "stateless"})) == "stateless"
        counted = await client.call_tool("count", {"steps": 2}, progress_callback=on_progress)
        assert text_of(counted) == "counted 2" and seen == [1.0, 2.0]


async def test_progress_and_sampling_through_the_sidecar(tools_sidecar):
    seen = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    async with Client(tools_sidecar.url, mode="legacy", sampling_callback=answer_sampling) as client:
        counted = await client.call_tool("count", {"steps": 3}, progress_callback=on_progress)
        assert text_of(counted) == "counted 3"
        assert seen == [(float(i), 3.0, f"step {i}") for i in range(1, 4)]
        assert text_of(await client.call_tool("ask_model", {"question": "hi"})) == "sampled hi"


async def test_elicitation_and_logging_through_the_sidecar(tools_sidecar):
    logged = []

    async def on_log(params):
        logged.append(params.data)

    async def answer_elicitation(ctx, params):
        return ElicitResult(action="accept", content={"colour": "teal"})

    async with Client(tools_sidecar.url, mode="legacy", elicitation_callback=answer_elicitation,
                      logging_callback=on_log) as client:
        assert text_of(await client.call_tool("ask_user", {})) == "accept:teal"
        assert text_of(await client.call_tool("chatty", {"text": "hello log"})) == "logged"
    assert logged == ["hello log"]


async def test_a_crash_reaches_the_client_as_an_error_and_the_next_call_works(tools_sidecar):
    starts = tools_sidecar.log().count("stdio upstream ready:")
    async with Client(tools_sidecar.url, mode="legacy") as client:
        before = text_of(await client.call_tool("whoami", {}))
        try:
            crashed = await client.call_tool("crash", {"code": 5})
        except MCPError as exc:
            assert "upstream exited" in exc.error.message
        else:
            assert crashed.is_error and "upstream exited" in text_of(crashed)
        # Readiness is a recent probe and may not have noticed the exit yet; the log says when the child is back.
        wait_until(lambda: tools_sidecar.log().count("stdio upstream ready:") >= starts + 1, timeout=30,
                   what="the restarted child to initialize")
        assert text_of(await client.call_tool("echo", {"text": "back"})) == "back"
        assert text_of(await client.call_tool("whoami", {})) != before
    assert "about to crash with code 5" in tools_sidecar.log()


async def test_mcp_server_time_behind_the_sidecar(tmp_path):
    with sidecar(["--upstream-command", shlex.join(TIME_SERVER)], tmp_path) as sc:
        async with Client(sc.url, mode="legacy") as client:
            assert "get_current_time" in {t.name for t in (await client.list_tools()).tools}
            answer = await client.call_tool("get_current_time", {"timezone": "Asia/Tokyo"})
            assert '"timezone": "Asia/Tokyo"' in text_of(answer)


@pytest.mark.node
async def test_a_stateless_era_client_reaches_a_handshake_only_stdio_server(tmp_path):
    with sidecar(["--upstream-command", shlex.join(EVERYTHING_SERVER)], tmp_path) as sc:
        seen = []

        async def on_progress(progress, total, message):
            seen.append(progress)

        async with Client(sc.url, mode=STATELESS_ERA) as client:
            assert "echo" in {t.name for t in (await client.list_tools()).tools}
            assert text_of(await client.call_tool("echo", {"message": "now"})) == "Echo: now"
            result = await client.call_tool("trigger-long-running-operation", {"duration": 0.3, "steps": 3},
                                            progress_callback=on_progress)
            assert not result.is_error and seen == [1.0, 2.0, 3.0]
            assert (await client.list_prompts()).prompts


@pytest.mark.node
async def test_server_everything_over_stdio_behind_the_sidecar(tmp_path):
    with sidecar(["--upstream-command", shlex.join(EVERYTHING_SERVER)], tmp_path) as sc:
        seen = []

        async def on_progress(progress, total, message):
            seen.append(progress)

        async with Client(sc.url, mode="auto") as client:
            # A handshake-only server: auto mode falls back to initialize through the bridge.
            assert client.protocol_version == "2025-11-25"
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"echo", "get-sum"} <= names
            assert text_of(await client.call_tool("echo", {"message": "hello"})) == "Echo: hello"
            assert "42" in text_of(await client.call_tool("get-sum", {"a": 40, "b": 2}))
            result = await client.call_tool("trigger-long-running-operation", {"duration": 0.3, "steps": 3},
                                            progress_callback=on_progress)
            assert not result.is_error
            assert seen == [1.0, 2.0, 3.0]


@pytest.fixture(scope="module")
def sse_sidecar(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sse")
    port = free_port()
    with running(sse_tools_server(port), log_path=tmp_path / "sse.log"):
        wait_until(lambda: port_open(port), timeout=20, what="the SSE server to listen")
        upstream = ["--upstream", f"http://127.0.0.1:{port}/sse", "--upstream-transport", "sse"]
        with sidecar(upstream, tmp_path) as sc:
            yield sc


@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA, "auto"])
async def test_a_legacy_sse_server_behind_the_sidecar(sse_sidecar, mode):
    seen = []

    async def on_progress(progress, total, message):
        seen.append(progress)

    async with Client(sse_sidecar.url, mode=mode, sampling_callback=answer_sampling) as client:
        assert client.protocol_version == ("2025-11-25" if mode == "legacy" else STATELESS_ERA)
        assert "echo" in {t.name for t in (await client.list_tools()).tools}
        assert text_of(await client.call_tool("echo", {"text": "via sse"})) == "via sse"
        counted = await client.call_tool("count", {"steps": 2}, progress_callback=on_progress)
        assert text_of(counted) == "counted 2" and seen == [1.0, 2.0]
        if mode == "legacy":  # server-to-client requests belong to sessions
            assert text_of(await client.call_tool("ask_model", {"question": "x"})) == "sampled x"


@pytest.mark.node
@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA])
async def test_a_handshake_only_legacy_sse_server_serves_both_eras_through_the_sidecar(tmp_path, mode):
    port = free_port()
    with running([EVERYTHING_SERVER[0], "sse"], env={"PORT": str(port)}, log_path=tmp_path / "everything.log"):
        wait_until(lambda: port_open(port), timeout=30, what="server-everything to listen")
        upstream = ["--upstream", f"http://127.0.0.1:{port}/sse", "--upstream-transport", "sse"]
        with sidecar(upstream, tmp_path) as sc:
            async with Client(sc.url, mode=mode) as client:
                assert "echo" in {t.name for t in (await client.list_tools()).tools}
                assert text_of(await client.call_tool("echo", {"message": "old"})) == "Echo: old"
