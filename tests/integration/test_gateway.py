"""The gateway at /mcp with real SDK clients (both protocol eras) in front of real SDK servers."""

from __future__ import annotations

import asyncio
import contextlib

import anyio
import mcp_types as types
import pytest
from mcp.client import Client

from helpers import async_wait_until
from helpers.registry_procs import beating, get_json, list_tools_of, registry_process, toy_server

MODES = ["legacy", "auto"]  # auto settles on 2026-07-28 (stateless) against the gateway


async def server_beat(name: str, url: str, **traits):
    return {"server": name, "instance": f"{name}-0", "endpoint": url, "tools": await list_tools_of(url), **traits}


def served(listed) -> set[str]:
    """Tool names from the servers behind the gateway (without the gateway's own toolmesh__ tools)."""
    return {t.name for t in listed.tools if not t.name.startswith("toolmesh__")}


def texts(result) -> list[str]:
    return [c.text for c in result.content if c.type == "text"]


@pytest.mark.parametrize("mode", MODES)
async def test_tools_are_listed_as_server__tool_and_called_with_progress(tmp_path, mode):
    with registry_process(tmp_path) as registry, toy_server(tmp_path, "alpha", "echo,slow") as (_, alpha):
        async with beating(registry, await server_beat("alpha", alpha)):
            async with Client(f"{registry}/mcp", mode=mode) as client:
                assert client.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
                listed = {t.name: t for t in (await client.list_tools()).tools}
                assert set(listed) == {"toolmesh__run_workflow", "alpha__echo", "alpha__slow"}
                assert listed["alpha__echo"].description.startswith("[alpha] Echo a message back")
                assert listed["alpha__echo"].input_schema["properties"]["message"]["type"] == "string"
                assert texts(await client.call_tool("alpha__echo", {"message": "hi"})) == ["alpha:hi"]
                progress = []

                async def on_progress(value, total, message):
                    progress.append((value, total, message))

                result = await client.call_tool("alpha__slow", {"steps": 3}, progress_callback=on_progress)
                assert texts(result) == ["alpha:done 3"]
                assert progress == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


@pytest.mark.parametrize("mode", MODES)
async def test_priority_decides_who_answers_to_the_bare_name(tmp_path, mode):
    with (registry_process(tmp_path) as registry,
          toy_server(tmp_path, "alpha") as (_, alpha), toy_server(tmp_path, "beta") as (_, beta)):
        async with beating(registry, await server_beat("alpha", alpha, priority=1)), \
                beating(registry, await server_beat("beta", beta, priority=5)):
            async with Client(f"{registry}/mcp", mode=mode) as client:
                assert served(await client.list_tools()) == {"alpha__echo", "beta__echo"}
                assert texts(await client.call_tool("echo", {"message": "x"})) == ["beta:x"]
                assert texts(await client.call_tool("alpha__echo", {"message": "x"})) == ["alpha:x"]
                assert texts(await client.call_tool("beta__echo", {"message": "x"})) == ["beta:x"]


async def test_equal_priority_goes_to_the_first_name_and_unknown_tools_are_errors(tmp_path):
    with (registry_process(tmp_path) as registry,
          toy_server(tmp_path, "beta") as (_, beta), toy_server(tmp_path, "alpha") as (_, alpha)):
        async with beating(registry, await server_beat("beta", beta)), beating(registry, await server_beat("alpha", alpha)):
            async with Client(f"{registry}/mcp", mode="legacy") as client:
                assert texts(await client.call_tool("echo", {"message": "x"})) == ["alpha:x"]
                with pytest.raises(Exception, match="unknown tool: gamma__echo"):
                    await client.call_tool("gamma__echo", {"message": "x"})
                # The session survives the error.
                assert texts(await client.call_tool("beta__echo", {"message": "y"})) == ["beta:y"]


async def test_a_killed_backend_leaves_and_the_session_keeps_working(tmp_path):
    changes = []

    async def on_message(message):
        if isinstance(message, types.ServerNotification) and message.method == "notifications/tools/list_changed":
            changes.append(message)

    with (registry_process(tmp_path, interval=0.2, missed=3) as registry,
          toy_server(tmp_path, "alpha") as (_, alpha), toy_server(tmp_path, "beta") as (beta_proc, beta)):
        async with beating(registry, await server_beat("alpha", alpha)):
            beta_beats = beating(registry, await server_beat("beta", beta))
            await beta_beats.__aenter__()
            async with Client(f"{registry}/mcp", mode="legacy", message_handler=on_message) as client:
                assert served(await client.list_tools()) == {"alpha__echo", "beta__echo"}
                assert texts(await client.call_tool("beta__echo", {"message": "1"})) == ["beta:1"]
                beta_proc.kill()
                beta_proc.wait()
                # Between the kill and the missed-heartbeat deadline a call fails cleanly, nothing more.
                with contextlib.suppress(Exception):
                    await client.call_tool("beta__echo", {"message": "2"})
                await beta_beats.__aexit__(None, None, None)

                async def beta_gone():
                    return served(await client.list_tools()) == {"alpha__echo"}

                await async_wait_until(beta_gone, timeout=5, what="beta's tools to leave the gateway")
                await async_wait_until(lambda: _true(changes), timeout=5, what="notifications/tools/list_changed")
                assert texts(await client.call_tool("alpha__echo", {"message": "still"})) == ["alpha:still"]


async def test_stateless_clients_hear_list_changed_through_subscriptions_listen(tmp_path):
    with registry_process(tmp_path, interval=0.2) as registry, toy_server(tmp_path, "alpha") as (_, alpha):
        async with Client(f"{registry}/mcp", mode="auto") as client:
            assert client.protocol_version == "2026-07-28"
            assert served(await client.list_tools()) == set()
            async with client.listen(tools_list_changed=True) as events:
                async with beating(registry, await server_beat("alpha", alpha)):
                    with anyio.fail_after(5):
                        event = await anext(aiter(events))
                    assert type(event).__name__ == "ToolsListChanged"
                    assert served(await client.list_tools()) == {"alpha__echo"}


async def test_pagination_walks_every_tool(tmp_path):
    with registry_process(tmp_path, extra=["--page-size", "3"]) as registry:
        tools = [{"name": f"t{i}", "inputSchema": {"type": "object"}} for i in range(8)]
        async with beating(registry, {"server": "many", "endpoint": "http://127.0.0.1:1/mcp", "tools": tools}):
            async with Client(f"{registry}/mcp", mode="legacy") as client:
                names, cursor, pages = [], None, 0
                while True:
                    page = await client.list_tools(cursor=cursor)
                    names += [t.name for t in page.tools if not t.name.startswith("toolmesh__")]
                    pages += 1
                    cursor = page.next_cursor
                    if not cursor:
                        break
                assert pages == 3 and names == [f"many__t{i}" for i in range(8)]


@pytest.mark.parametrize("mode", MODES)
async def test_cancelling_a_call_releases_the_backend(tmp_path, mode):
    # Session era: notifications/cancelled; stateless era: the client closes the response stream.
    with registry_process(tmp_path) as registry, toy_server(tmp_path, "alpha", "hang,echo") as (_, alpha):
        async with beating(registry, await server_beat("alpha", alpha)):
            async with Client(f"{registry}/mcp", mode=mode) as client:
                started = asyncio.Event()

                async def on_progress(value, total, message):
                    started.set()

                async def in_flight():
                    (server,) = (await get_json(f"{registry}/v1/servers"))["servers"]
                    return server["instances"][0]["inFlight"]

                with anyio.move_on_after(10) as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(lambda: client.call_tool("alpha__hang", {}, progress_callback=on_progress))
                        await started.wait()
                        assert await in_flight() == 1
                        tg.cancel_scope.cancel()
                assert not scope.cancelled_caught
                await async_wait_until(lambda: _zero(in_flight), timeout=5, what="the gateway to drop the call")
                assert texts(await client.call_tool("alpha__echo", {"message": "after"})) == ["alpha:after"]


async def _true(items):
    return bool(items)


async def _zero(probe):
    return await probe() == 0


async def test_browsers_from_foreign_origins_are_refused(tmp_path):
    import aiohttp

    with registry_process(tmp_path) as registry:
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "browser", "version": "1"}}}
        headers = {"Accept": "application/json, text/event-stream"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{registry}/mcp", json=init,
                                 headers={**headers, "Origin": "https://evil.example"}) as resp:
                assert resp.status == 403
            async with http.post(f"{registry}/mcp", json=init,
                                 headers={**headers, "Origin": "http://localhost:3000"}) as resp:
                assert resp.status == 200 and "Mcp-Session-Id" in resp.headers
