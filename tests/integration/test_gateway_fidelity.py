"""The gateway as a faithful MCP server: the conformance fixture behind a real sidecar behind the registry, in both eras."""

from __future__ import annotations

import sys

import pytest
from mcp.client import Client
from mcp.types import CreateMessageResult, ElicitResult, TextContent

from helpers import ROOT, async_wait_until, free_port, listening
from helpers.registry_procs import get_json, list_tools_of, registry_process
from helpers.sidecar import sidecar

FIXTURE = ROOT / "tests" / "conformance" / "fixture_server.py"
NOTIFYING = ROOT / "tests" / "helpers" / "notifying_server.py"
SECRET = "heartbeat-secret"


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """(fixture URL, gateway URL): the fixture reached directly, and as server `fix` through sidecar and gateway."""
    tmp = tmp_path_factory.mktemp("fidelity")
    port = free_port()
    env = {"TOOLMESH_REGISTRY_SECRET": SECRET}
    with (listening([sys.executable, str(FIXTURE), "--port", str(port)], port, what="fixture server",
                    log_path=tmp / "fixture.log"),
          registry_process(tmp, secret=SECRET) as registry,
          sidecar(["--upstream", f"http://127.0.0.1:{port}/mcp"], tmp, "--server-name", "fix", "--registry", registry,
                  env=env)):
        yield f"http://127.0.0.1:{port}/mcp", registry


async def listed(registry: str) -> bool:
    return any(t["name"] == "fix__test_simple_text" for t in (await get_json(f"{registry}/v1/tools"))["tools"])


@pytest.fixture
async def gateway(composed):
    direct, registry = composed
    await async_wait_until(lambda: listed(registry), timeout=20, what="the fixture's tools in the catalogue")
    return direct, f"{registry}/mcp"


def text_of(result) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_tool_definitions_are_kept_but_for_name_and_description(gateway, mode):
    direct, url = gateway
    upstream = {t["name"]: t for t in await list_tools_of(direct)}
    async with Client(url, mode=mode) as client:
        through = {t.name: t.model_dump(by_alias=True, exclude_none=True, mode="json")
                   for t in (await client.list_tools()).tools}
    for name, definition in upstream.items():
        seen = through[f"fix__{name}"]
        assert seen["description"] == f"[fix] {definition.get('description', '')}".rstrip()
        assert {k: v for k, v in seen.items() if k not in ("name", "description")} == \
               {k: v for k, v in definition.items() if k not in ("name", "description")}, name
    # The 2020-12 keywords survive (the schema is passed on, never rebuilt).
    schema = through["fix__json_schema_2020_12_tool"]["inputSchema"]
    assert schema == upstream["json_schema_2020_12_tool"]["inputSchema"]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_prompts_and_resources_are_composed_and_routed(gateway, mode):
    _, url = gateway
    async with Client(url, mode=mode) as client:
        prompts = {p.name: p for p in (await client.list_prompts()).prompts}
        assert "fix__test_simple_prompt" in prompts
        assert prompts["fix__test_simple_prompt"].description.startswith("[fix] ")
        got = await client.get_prompt("fix__test_prompt_with_arguments", {"arg1": "a", "arg2": "b"})
        assert got.messages[0].content.text == "Prompt with arguments: arg1='a', arg2='b'"
        # One server offers it: the bare name answers too.
        bare = await client.get_prompt("test_simple_prompt")
        assert bare.messages[0].content.text == "This is a simple prompt for testing."

        uris = {str(r.uri) for r in (await client.list_resources()).resources}
        assert {"test://static-text", "test://static-binary", "test://watched-resource"} <= uris
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert "test://template/{id}/data" in templates
        read = await client.read_resource("test://static-text")
        assert read.contents[0].text == "This is the content of the static text resource."
        templated = await client.read_resource("test://template/42/data")
        assert '"id": "42"' in templated.contents[0].text
        if mode == "legacy":
            await client.subscribe_resource("test://watched-resource")  # the session era still has it
            await client.unsubscribe_resource("test://watched-resource")


async def test_sampling_and_elicitation_reach_the_caller_and_their_answers_the_server(gateway):
    _, url = gateway
    asked = []

    async def answer_sampling(ctx, params):
        asked.append(params.messages[0].content.text)
        return CreateMessageResult(role="assistant", content=TextContent(type="text", text="forty-two"),
                                   model="test-model")

    async def answer_elicitation(ctx, params):
        asked.append(params.message)
        return ElicitResult(action="accept", content={"response": "teal"})

    async with Client(url, mode="legacy", sampling_callback=answer_sampling,
                      elicitation_callback=answer_elicitation) as client:
        sampled = await client.call_tool("fix__test_sampling", {"prompt": "the answer?"})
        assert text_of(sampled) == "LLM response: forty-two"
        elicited = await client.call_tool("fix__test_elicitation", {"message": "favourite colour?"})
        assert text_of(elicited) == 'User response: action=accept, content={"response":"teal"}'
    assert asked == ["the answer?", "favourite colour?"]


async def test_logging_and_progress_of_a_call_reach_the_caller(gateway):
    _, url = gateway
    logged, progressed = [], []

    async def on_log(params):
        logged.append(params.data)

    async def on_progress(progress, total, message):
        progressed.append(progress)

    async with Client(url, mode="legacy", logging_callback=on_log) as client:
        await client.call_tool("fix__test_tool_with_logging", {})
        await client.call_tool("fix__test_tool_with_progress", {}, progress_callback=on_progress)
    assert logged and progressed


@pytest.fixture(scope="module")
def notifying(tmp_path_factory):
    """The gateway URL in front of a sidecar in front of a server that announces changes outside calls."""
    tmp = tmp_path_factory.mktemp("notifying")
    port = free_port()
    env = {"TOOLMESH_REGISTRY_SECRET": SECRET}
    with (listening([sys.executable, str(NOTIFYING), "--port", str(port)], port, what="notifying server",
                    log_path=tmp / "notifying.log"),
          registry_process(tmp, secret=SECRET) as registry,
          sidecar(["--upstream", f"http://127.0.0.1:{port}/mcp"], tmp, "--server-name", "news", "--registry",
                  registry, env=env)):
        yield registry


async def test_resource_updates_and_list_changes_sent_outside_calls_reach_the_subscriber(notifying):
    async def news_listed():
        return any(t["name"] == "news__change" for t in (await get_json(f"{notifying}/v1/tools"))["tools"])

    await async_wait_until(news_listed, timeout=20, what="the notifying server in the catalogue")
    seen = []

    async def on_message(message):
        root = getattr(message, "root", message)
        seen.append((getattr(root, "method", None), str(getattr(getattr(root, "params", None), "uri", ""))))

    async with Client(f"{notifying}/mcp", mode="legacy", message_handler=on_message) as client:
        assert text_of(await client.call_tool("news__change", {})) == "changed"

        async def announced():
            return {("notifications/resources/updated", "test://watched"),
                    ("notifications/prompts/list_changed", ""),
                    ("notifications/resources/list_changed", "")} <= set(seen)

        await async_wait_until(announced, timeout=10, what=f"the server's announcements relayed (seen {seen})")
