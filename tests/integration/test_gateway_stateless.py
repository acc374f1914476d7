"""Stateless (2026-07-28) callers through the gateway: input_required round trips and declared capabilities reach
the server behind the sidecar; session-era callers and session-era-only servers keep working."""

from __future__ import annotations

import re
import sys

import anyio
import pytest
from mcp.client import Client
from mcp.shared.exceptions import MCPError
from mcp.types import CreateMessageResult, ElicitResult, ListRootsResult, Root, TextContent

from helpers import ROOT, async_wait_until, free_port, listening
from helpers.mcp_servers import everything_http_server, sdk_http_server
from helpers.stateless_calls import STATELESS_ERA as STATELESS
from helpers.registry_procs import get_json, registry_process
from helpers.sidecar import http_get, sidecar

FIXTURE = ROOT / "tests" / "conformance" / "fixture_server.py"
SECRET = "heartbeat-secret"
MISSING_REQUIRED_CLIENT_CAPABILITY = -32021


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(registry URL, everything's sidecar): the conformance fixture (2026-07-28 and the session era) behind a
    sidecar as `fix`, the SDK test server as `tools`, and server-everything (the session era only) as `everything`."""
    tmp = tmp_path_factory.mktemp("stateless")
    port = free_port()
    env = {"TOOLMESH_REGISTRY_SECRET": SECRET}
    with (listening([sys.executable, str(FIXTURE), "--port", str(port)], port, what="fixture server",
                    log_path=tmp / "fixture.log"),
          everything_http_server(log_path=tmp / "everything.log") as everything,
          sdk_http_server(log_path=tmp / "tools.log") as tools,
          registry_process(tmp, secret=SECRET) as registry,
          sidecar(["--upstream", f"http://127.0.0.1:{port}/mcp"], tmp, "--server-name", "fix", "--registry", registry,
                  env=env),
          sidecar(["--upstream", tools], tmp, "--server-name", "tools", "--registry", registry, env=env,
                  name="tools-sidecar"),
          sidecar(["--upstream", everything], tmp, "--server-name", "everything", "--registry", registry, env=env,
                  name="everything-sidecar") as everything_sidecar):
        yield registry, everything_sidecar


@pytest.fixture
async def gateway(stack):
    registry, _ = stack

    async def all_listed():
        names = {t["name"] for t in (await get_json(f"{registry}/v1/tools"))["tools"]}
        return {"fix__test_simple_text", "everything__echo", "tools__slow"} <= names

    await async_wait_until(all_listed, timeout=30, what="every server's tools in the catalogue")
    return f"{registry}/mcp"


def text_of(result) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def test_a_tool_that_elicits_gets_its_answer_after_the_input_round_trip(gateway):
    asked = []

    async def answer(ctx, params):
        asked.append(params.message)
        return ElicitResult(action="accept", content={"name": "Ada", "color": "teal"})

    async with Client(gateway, mode=STATELESS, elicitation_callback=answer) as client:
        assert client.protocol_version == STATELESS
        result = await client.call_tool("fix__test_input_required_result_elicitation", {})
        assert text_of(result) == "Hello, Ada!"
        assert asked == ["What is your name?"]
        # Two rounds, the server's requestState carried back each time (the bare name is routed the same way).
        result = await client.call_tool("test_input_required_result_multi_round", {})
        assert text_of(result) == "Completed: favorite color teal"
        assert asked[1:] == ["Step 1: What is your name?", "Step 2: What is your favorite color?"]


async def test_sampling_roots_and_a_prompt_that_asks_round_trip_too(gateway):
    async def sample(ctx, params):
        return CreateMessageResult(role="assistant", content=TextContent(type="text", text="Paris"), model="m")

    async def elicit(ctx, params):
        return ElicitResult(action="accept", content={"context": "tea", "name": "Ada"})

    async def roots(ctx):
        return ListRootsResult(roots=[Root(uri="file:///work/project", name="project")])

    async with Client(gateway, mode=STATELESS, sampling_callback=sample, elicitation_callback=elicit,
                      list_roots_callback=roots) as client:
        assert text_of(await client.call_tool("fix__test_input_required_result_sampling", {})) == "LLM response: Paris"
        assert text_of(await client.call_tool("fix__test_input_required_result_list_roots", {})) == \
            "Roots: file:///work/project"
        assert text_of(await client.call_tool("fix__test_input_required_result_multiple_inputs", {})) == \
            "Received all inputs for Ada"
        prompt = await client.get_prompt("fix__test_input_required_result_prompt")
        # (The fixture's prompt function returns a whole GetPromptResult, which MCPServer renders as its text.)
        assert "Prompt with context: tea" in prompt.messages[0].content.text


async def test_the_input_required_result_reaches_the_caller_as_the_server_wrote_it(gateway):
    tool = "fix__test_input_required_result_request_state"
    async with Client(gateway, mode=STATELESS) as client:
        first = await client.session.call_tool(tool, {}, allow_input_required=True)
        assert first.result_type == "input_required"
        assert set(first.input_requests) == {"confirm"}
        assert first.meta["io.modelcontextprotocol/serverInfo"]["name"] == "toolmesh-conformance-fixture"
        assert first.request_state  # sealed by the server's SDK: only its own copy opens
        confirmed = {"confirm": ElicitResult(action="accept", content={"ok": True})}
        done = await client.session.call_tool(tool, {}, input_responses=confirmed, request_state=first.request_state)
        assert text_of(done) == "state-ok: confirmation received"
        with pytest.raises(MCPError):
            await client.session.call_tool(tool, {}, input_responses=confirmed,
                                           request_state=first.request_state[:-4] + "AAAA")


async def test_a_caller_that_declares_no_capability_is_asked_for_nothing(gateway):
    async with Client(gateway, mode=STATELESS) as client:
        # The server sees the caller's own (empty) capabilities, not the gateway's: it asks nothing, or refuses.
        assert text_of(await client.call_tool("fix__test_input_required_result_capabilities", {})) == \
            "capabilities respected"
        with pytest.raises(MCPError) as refused:
            await client.call_tool("fix__test_missing_capability", {})
        assert refused.value.error.code == MISSING_REQUIRED_CLIENT_CAPABILITY

    async def sample(ctx, params):
        return CreateMessageResult(role="assistant", content=TextContent(type="text", text="-"), model="m")

    async with Client(gateway, mode=STATELESS, sampling_callback=sample) as client:
        assert text_of(await client.call_tool("fix__test_missing_capability", {})) == "Sampling capability is declared"


async def test_progress_and_the_gateways_meta_reach_a_stateless_caller(gateway):
    progressed = []

    async def on_progress(progress, total, message):
        progressed.append(progress)

    async with Client(gateway, mode=STATELESS) as client:
        result = await client.call_tool("fix__test_tool_with_progress", {}, progress_callback=on_progress)
    assert progressed
    assert result.meta["io.modelcontextprotocol/serverInfo"]["name"] == "toolmesh-gateway"


async def test_closing_the_stream_cancels_the_call_at_the_server(gateway):
    async with Client(gateway, mode=STATELESS) as client:
        async def counted():
            return (await client.call_tool("tools__calls", {})).structured_content

        before = await counted()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.call_tool("tools__slow", {"seconds": 60}))
            await async_wait_until(lambda: _more(counted, before, "slow_started"), timeout=10,
                                   what="the slow call to start at the server")
            tg.cancel_scope.cancel()
        await async_wait_until(lambda: _more(counted, before, "slow_cancelled"), timeout=10,
                               what="the server to see the call cancelled")


async def _more(counted, before, key):
    return (await counted())[key] > before[key]


async def test_a_session_era_caller_is_still_asked_on_its_session(gateway):
    asked = []

    async def answer(ctx, params):
        asked.append(params.message)
        return ElicitResult(action="accept", content={"response": "teal"})

    async with Client(gateway, mode="legacy", elicitation_callback=answer) as client:
        assert client.protocol_version != STATELESS
        elicited = await client.call_tool("fix__test_elicitation", {"message": "favourite colour?"})
        assert text_of(elicited) == 'User response: action=accept, content={"response":"teal"}'
    assert asked == ["favourite colour?"]


def calls_counted(metrics: str, tool: str) -> dict[str, float]:
    """The sidecar's `toolmesh_requests_total` for tools/call of `tool`, by outcome."""
    pattern = re.compile(r'^toolmesh_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.M)
    counted = {}
    for match in pattern.finditer(metrics):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("method") == "tools/call" and labels.get("tool") == tool:
            counted[labels["outcome"]] = float(match["value"])
    return counted


async def test_a_session_era_only_server_serves_stateless_callers_through_sessions(gateway, stack):
    _, everything_sidecar = stack
    async with Client(gateway, mode=STATELESS) as client:
        for word in ("one", "two", "three"):
            assert text_of(await client.call_tool("everything__echo", {"message": word})) == f"Echo: {word}"
    _, metrics = http_get(f"{everything_sidecar.base}/metrics")
    # The stateless request was tried once, refused by the server, and never again: three calls answered.
    assert calls_counted(metrics.decode(), "echo") == {"error": 1.0, "ok": 3.0}
