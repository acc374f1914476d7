"""The sidecar as a transparent proxy: official SDK clients of both protocol eras through it to SDK servers."""

from __future__ import annotations

import time

import httpx2
import orjson
import pytest
from mcp import Client
from mcp.types import CreateMessageResult, ElicitResult, TextContent

from helpers.mcp_servers import sdk_http_server
from helpers.stateless_calls import STATELESS_ERA
from helpers.sidecar import sidecar

ACCEPT = "application/json, text/event-stream"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with sdk_http_server(resumable=True, log_path=tmp_path_factory.mktemp("up") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def proxied(upstream, tmp_path_factory):
    with sidecar(["--upstream", upstream], tmp_path_factory.mktemp("sc")) as sc:
        yield sc


@pytest.fixture(scope="module")
def stateless_upstream(tmp_path_factory):
    with sdk_http_server(stateless=True, json_response=True,
                         log_path=tmp_path_factory.mktemp("up") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def proxied_stateless(stateless_upstream, tmp_path_factory):
    with sidecar(["--upstream", stateless_upstream], tmp_path_factory.mktemp("sc")) as sc:
        yield sc


def text_of(result) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def answer_sampling(ctx, params):
    return CreateMessageResult(role="assistant", model="test-model",
                               content=TextContent(type="text", text="sampled " + params.messages[0].content.text))


async def answer_elicitation(ctx, params):
    return ElicitResult(action="accept", content={"colour": "teal"})


@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA])
async def test_tools_list_and_call_through_the_sidecar(proxied, mode):
    async with Client(proxied.url, mode=mode) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"echo", "add", "count", "fail"} <= names
        assert text_of(await client.call_tool("echo", {"text": "über ✓"})) == "über ✓"
        assert text_of(await client.call_tool("add", {"a": 2, "b": 40})) == "42"
        failed = await client.call_tool("fail", {"reason": "nope"})
        assert failed.is_error


@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA])
async def test_progress_notifications_arrive_in_order(proxied, mode):
    seen = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    async with Client(proxied.url, mode=mode) as client:
        result = await client.call_tool("count", {"steps": 4}, progress_callback=on_progress)
    assert text_of(result) == "counted 4"
    assert seen == [(float(i), 4.0, f"step {i}") for i in range(1, 5)]


async def test_sampling_and_elicitation_round_trips_in_a_session(proxied):
    async with Client(proxied.url, mode="legacy", sampling_callback=answer_sampling,
                      elicitation_callback=answer_elicitation) as client:
        assert text_of(await client.call_tool("ask_sampling", {"prompt": "hello"})) == "sampled hello"
        assert text_of(await client.call_tool("ask_elicitation", {})) == "colour=teal"


@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA])
async def test_stateless_json_upstream(proxied_stateless, mode):
    async with Client(proxied_stateless.url, mode=mode) as client:
        assert text_of(await client.call_tool("echo", {"text": "plain json"})) == "plain json"
        assert "echo" in {t.name for t in (await client.list_tools()).tools}


async def raw_post(url: str, message, headers: dict | None = None) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(url, content=orjson.dumps(message),
                               headers={"Content-Type": "application/json", "Accept": ACCEPT, **(headers or {})})


def initialize_message(request_id=1):
    return {"jsonrpc": "2.0", "id": request_id, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "raw", "version": "1"}}}


def sse_messages(body: bytes) -> list[dict]:
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].lstrip() for line in block.split(b"\n") if line.startswith(b"data:")]
        if data and b"".join(data).strip():
            out.append(orjson.loads(b"\n".join(data)))
    return out


async def test_session_headers_notifications_202_and_delete(proxied):
    init = await raw_post(proxied.url, initialize_message())
    assert init.status_code == 200
    session = init.headers["mcp-session-id"]
    assert sse_messages(init.content)[0]["result"]["protocolVersion"] == "2025-11-25"
    common = {"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
    note = await raw_post(proxied.url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, common)
    assert note.status_code == 202
    assert note.content == b""
    unknown = await raw_post(proxied.url, {"jsonrpc": "2.0", "id": 7, "method": "no/such/method"}, common)
    answers = sse_messages(unknown.content) if unknown.headers["content-type"].startswith("text/event-stream") \
        else [unknown.json()]
    assert answers[-1]["id"] == 7 and answers[-1]["error"]["code"] == -32601
    async with httpx2.AsyncClient(timeout=10) as http:
        gone = await http.delete(proxied.url, headers=common)
        assert gone.status_code in (200, 204)
        after = await http.post(proxied.url, content=orjson.dumps({"jsonrpc": "2.0", "id": 8, "method": "ping"}),
                                headers={"Content-Type": "application/json", "Accept": ACCEPT, **common})
        assert after.status_code == 404


async def test_batch_is_split_through_the_chain_and_reassembled(proxied_stateless):
    meta = {"io.modelcontextprotocol/protocolVersion": STATELESS_ERA,
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"}}
    batch = [
        {"jsonrpc": "2.0", "id": "a", "method": "tools/call",
         "params": {"name": "echo", "arguments": {"text": "one"}, "_meta": meta}},
        {"jsonrpc": "2.0", "id": "b", "method": "tools/call",
         "params": {"name": "add", "arguments": {"a": 1, "b": 1}, "_meta": meta}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"not": "json-rpc"},
    ]
    resp = await raw_post(proxied_stateless.url, batch, {"MCP-Protocol-Version": STATELESS_ERA})
    assert resp.status_code == 200, resp.content
    answers = {a["id"]: a for a in resp.json()}
    assert answers["a"]["result"]["content"][0]["text"] == "one"
    assert answers["b"]["result"]["content"][0]["text"] == "2"
    assert answers[None]["error"]["code"] == -32600
    assert len(answers) == 3


async def test_unknown_mcp_headers_reach_the_upstream_and_hop_headers_do_not(proxied):
    async with Client(proxied.url, mode="legacy") as client:
        pass
    init = await raw_post(proxied.url, initialize_message())
    common = {"Mcp-Session-Id": init.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
    await raw_post(proxied.url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, common)
    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "show_headers", "arguments": {}}}
    resp = await raw_post(proxied.url, call, {**common, "Mcp-Param-Region": "eu", "Mcp-Future-Thing": "x",
                                              "Mcp-Name": "show_headers", "Mcp-Method": "tools/call",
                                              "Proxy-Authorization": "secret"})
    seen = orjson.loads(sse_messages(resp.content)[-1]["result"]["content"][0]["text"])
    assert seen["mcp-param-region"] == "eu"
    assert seen["mcp-future-thing"] == "x"
    assert seen["mcp-session-id"] == common["Mcp-Session-Id"]
    assert "proxy-authorization" not in seen
    assert seen["host"].startswith("127.0.0.1:")


@pytest.fixture(scope="module")
def proxied_everything(tmp_path_factory):
    from helpers.mcp_servers import everything_http_server

    tmp = tmp_path_factory.mktemp("everything")
    with everything_http_server(log_path=tmp / "everything.log") as url, sidecar(["--upstream", url], tmp) as sc:
        yield sc


async def test_reference_server_everything_through_the_sidecar(proxied_everything):
    seen = []

    async def on_progress(progress, total, message):
        seen.append(progress)

    async with Client(proxied_everything.url, mode="legacy", sampling_callback=answer_sampling) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"echo", "get-sum", "trigger-long-running-operation"} <= names
        assert "hello" in text_of(await client.call_tool("echo", {"message": "hello"}))
        assert "5" in text_of(await client.call_tool("get-sum", {"a": 2, "b": 3}))
        done = await client.call_tool("trigger-long-running-operation", {"duration": 0.3, "steps": 3},
                                      progress_callback=on_progress)
        assert not done.is_error
        assert seen == [1.0, 2.0, 3.0]
        assert "trigger-sampling-request" in names  # offered because the client can sample
        sampled = await client.call_tool("trigger-sampling-request", {"prompt": "ping", "maxTokens": 10})
        assert "context: ping" in text_of(sampled) and '"model": "test-model"' in text_of(sampled)


async def test_resumption_with_last_event_id_after_a_dropped_stream(proxied):
    init = await raw_post(proxied.url, initialize_message())
    common = {"Mcp-Session-Id": init.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
    await raw_post(proxied.url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, common)
    call = {"jsonrpc": "2.0", "id": "long", "method": "tools/call",
            "params": {"name": "count", "arguments": {"steps": 4, "delay": 0.3}, "_meta": {"progressToken": "p"}}}
    last_id = None
    first: list[dict] = []
    async with httpx2.AsyncClient(timeout=10) as http:
        async with http.stream("POST", proxied.url, content=orjson.dumps(call),
                               headers={"Content-Type": "application/json", "Accept": ACCEPT, **common}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            buffer = b""
            async for chunk in resp.aiter_bytes():
                buffer += chunk
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
                    last_id = lines.get(b"id", last_id)
                    if lines.get(b"data", b"").strip():
                        first.append(orjson.loads(lines[b"data"]))
                if first:
                    break  # drop the stream after the first progress notification
        assert first[0]["method"] == "notifications/progress"
        rest: list[dict] = []
        # As a client does, resume again from the last event seen whenever a resumed stream ends early:
        # a server that has not yet noticed the dropped stream replays what it stored and closes.
        deadline = time.monotonic() + 15
        while not any(m.get("id") == "long" for m in rest):
            assert time.monotonic() < deadline, f"no answer after resuming: {rest}"
            buffer = b""
            async with http.stream("GET", proxied.url, headers={
                    "Accept": "text/event-stream", "Last-Event-ID": last_id.decode(), **common}) as resumed:
                assert resumed.status_code == 200
                async for chunk in resumed.aiter_bytes():
                    buffer += chunk.replace(b"\r\n", b"\n")
                    complete, _, buffer = buffer.rpartition(b"\n\n")
                    for block in complete.split(b"\n\n"):
                        ids = [line[3:].strip() for line in block.split(b"\n") if line.startswith(b"id:")]
                        last_id = ids[-1] if ids else last_id
                        rest.extend(sse_messages(block))
                    if any(m.get("id") == "long" for m in rest):
                        break
    progress = [m["params"]["progress"] for m in first + rest if m.get("method") == "notifications/progress"]
    assert progress == [1, 2, 3, 4]
    assert rest[-1]["id"] == "long" and rest[-1]["result"]["content"][0]["text"] == "counted 4"


async def test_tool_listings_feed_the_catalogue_and_list_changed_marks_it_stale(upstream, tmp_path):
    from helpers import async_wait_until
    from helpers.sidecar import readyz

    with sidecar(["--upstream", upstream], tmp_path) as sc:
        assert readyz(sc.base)[1]["toolsStale"] is True
        async with Client(sc.url, mode="legacy") as client:
            listed = len((await client.list_tools()).tools)
            assert readyz(sc.base)[1] == {**readyz(sc.base)[1], "tools": listed, "toolsStale": False}
            await client.call_tool("change_tools", {})

            async def stale():
                return readyz(sc.base)[1]["toolsStale"]

            await async_wait_until(stale, timeout=10, what="list_changed to mark the catalogue stale")
            assert len((await client.list_tools()).tools) == listed + 1
            assert readyz(sc.base)[1]["tools"] == listed + 1


async def test_subscription_stream_outlives_the_upstream_timeout(tmp_path):
    """A 2026-07-28 `subscriptions/listen` stream stays open while quiet and carries list_changed when it comes."""
    import asyncio

    with sdk_http_server(stateless=True, log_path=tmp_path / "up.log") as url:
        with sidecar(["--upstream", url], tmp_path, "--upstream-timeout", "1") as sc:
            async with Client(sc.url, mode=STATELESS_ERA) as listener, Client(sc.url, mode=STATELESS_ERA) as caller:
                async with listener.listen(tools_list_changed=True) as subscription:
                    await asyncio.sleep(1.5)  # quiet for longer than --upstream-timeout, on purpose
                    await caller.call_tool("change_tools", {})
                    event = await asyncio.wait_for(anext(aiter(subscription)), 10)
    assert "tools" in type(event).__name__.lower() or "list_changed" in str(event)


async def test_concurrent_calls_each_get_their_own_answer(proxied, proxied_stateless):
    import asyncio

    async with Client(proxied.url, mode="legacy") as client:
        texts = [f"session call {i}" for i in range(25)]
        results = await asyncio.gather(*(client.call_tool("echo", {"text": t}) for t in texts))
        assert [text_of(r) for r in results] == texts

    meta = {"io.modelcontextprotocol/protocolVersion": STATELESS_ERA, "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"}}
    headers = {"Content-Type": "application/json", "Accept": ACCEPT, "MCP-Protocol-Version": STATELESS_ERA,
               "Mcp-Method": "tools/call", "Mcp-Name": "add"}
    async with httpx2.AsyncClient(timeout=30, limits=httpx2.Limits(max_connections=40)) as http:
        async def add(i: int) -> dict:
            call = {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                    "params": {"name": "add", "arguments": {"a": i, "b": 1000}, "_meta": meta}}
            return (await http.post(proxied_stateless.url, content=orjson.dumps(call), headers=headers)).json()

        answers = await asyncio.gather(*(add(i) for i in range(60)))
    assert [(a["id"], a["result"]["content"][0]["text"]) for a in answers] == [(i, str(i + 1000)) for i in range(60)]


async def test_silent_server_stream_gets_keepalive_comments(upstream, tmp_path):
    with sidecar(["--upstream", upstream], tmp_path, "--sse-keepalive", "0.2") as sc:
        init = await raw_post(sc.url, initialize_message())
        common = {"Mcp-Session-Id": init.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
        await raw_post(sc.url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, common)
        received = b""
        async with httpx2.AsyncClient(timeout=10) as http:
            async with http.stream("GET", sc.url, headers={"Accept": "text/event-stream", **common}) as stream:
                assert stream.status_code == 200
                async for chunk in stream.aiter_bytes():
                    received += chunk
                    if received.count(b": keep-alive\n\n") >= 2:
                        break
        assert received.count(b": keep-alive\n\n") >= 2
