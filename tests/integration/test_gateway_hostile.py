"""The gateway facing hostile callers: sessions bound to their opener, answers only from the asked, bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import aiohttp
import orjson
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import ElicitResult, TextContent

from helpers import ROOT, async_wait_until, free_port, listening, toolmesh_cli
from helpers.registry_procs import beating, list_tools_of, registry_process, toy_server

FIXTURE = ROOT / "tests" / "conformance" / "fixture_server.py"
SECRET = "heartbeat-secret"
MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                         "clientInfo": {"name": "raw", "version": "1"}}}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The conformance fixture (it elicits) and the toy server (it hangs) behind a registry; yields its base URL."""
    tmp = tmp_path_factory.mktemp("hostile")
    port = free_port()
    with (listening([sys.executable, str(FIXTURE), "--port", str(port)], port, what="fixture server",
                    log_path=tmp / "fixture.log"),
          registry_process(tmp, secret=SECRET) as registry,
          toy_server(tmp, "toy", "hang,echo") as (_, toy)):
        yield registry, f"http://127.0.0.1:{port}/mcp", toy


@pytest.fixture
async def registry(gateway):
    base, fixture, toy = gateway
    beats = [{"server": "fix", "instance": "fix-0", "endpoint": fixture, "tools": await list_tools_of(fixture)},
             {"server": "toy", "instance": "toy-0", "endpoint": toy, "tools": await list_tools_of(toy)}]
    async with beating(base, beats[0], secret=SECRET), beating(base, beats[1], secret=SECRET):
        yield base


class Caller:
    """An SDK client at the gateway with a token of its own, remembering the session id the gateway gave it."""

    def __init__(self, registry: str, token: str | None, **callbacks) -> None:
        self.session_id: str | None = None
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"} if token else None)

        async def remember(response) -> None:
            self.session_id = response.headers.get("mcp-session-id") or self.session_id

        http.event_hooks["response"].append(remember)
        self.client = Client(streamable_http_client(f"{registry}/mcp", http_client=http), mode="legacy", **callbacks)


async def raw(registry: str, method: str, body: object = None, *, session: str | None = None,
              token: str | None = None) -> tuple[int, bytes]:
    """One HTTP request to the gateway as curl would send it; (status, body) (an SSE body only to its first event)."""
    headers = dict(MCP_HEADERS)
    if session is not None:
        headers["Mcp-Session-Id"] = session
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"{registry}/mcp", headers=headers,
                                data=orjson.dumps(body) if body is not None else None) as resp:
            if resp.content_type == "text/event-stream":
                return resp.status, await resp.content.readline()
            return resp.status, await resp.read()


def text_of(result) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


@contextlib.asynccontextmanager
async def asked(registry: str, token: str):
    """A caller whose call to `fix__test_elicitation` is waiting for its person's answer.

    Yields (caller, the gateway's id of the question, release(answer), the call's task).
    """
    question: asyncio.Future = asyncio.get_running_loop().create_future()
    answer: asyncio.Future = asyncio.get_running_loop().create_future()

    async def person(ctx, params):
        question.set_result(ctx.request_id)
        return ElicitResult(action="accept", content={"response": await answer})

    caller = Caller(registry, token, elicitation_callback=person)
    async with caller.client as client:
        call = asyncio.create_task(client.call_tool("fix__test_elicitation", {"message": "favourite colour?"}))
        try:
            ask_id = await asyncio.wait_for(asyncio.shield(question), 20)
            yield caller, ask_id, answer.set_result, call
        finally:
            if not answer.done():
                answer.set_result("gone")
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(call, 20)


async def test_only_the_asked_session_and_principal_can_answer_a_server_request(registry):
    async with asked(registry, "victim-token") as (victim, ask_id, release, call):
        forged = {"jsonrpc": "2.0", "result": {"action": "accept", "content": {"response": "forged"}}}
        # Without the session, even the right id (or a guess in the old sequential scheme) leads nowhere.
        guesses = [ask_id, *(f"toolmesh-{n}" for n in range(1, 50))]
        for guess in guesses:
            assert (await raw(registry, "POST", {**forged, "id": guess}))[0] == 202  # no session: ignored
        for token in ("mallory-token", None):
            status, body = await raw(registry, "POST", {**forged, "id": ask_id}, session=victim.session_id,
                                     token=token)
            assert status == 404 and b"unknown or ended session" in body
        assert not call.done()
        release("teal")
        result = await asyncio.wait_for(call, 20)
    assert text_of(result) == 'User response: action=accept, content={"response":"teal"}'


async def test_another_principal_cannot_cancel_listen_to_or_end_a_session(registry):
    async with asked(registry, "victim-token") as (victim, ask_id, release, call):
        session = victim.session_id
        for token in ("mallory-token", None):
            for request_id in range(10):
                cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": request_id}}
                assert (await raw(registry, "POST", cancel, session=session, token=token))[0] == 404
            listed = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
            status, body = await raw(registry, "POST", listed, session=session, token=token)
            assert status == 404 and b"unknown or ended session" in body
            assert (await raw(registry, "GET", session=session, token=token))[0] == 404
            assert (await raw(registry, "DELETE", session=session, token=token))[0] == 404
        assert not call.done()
        release("teal")
        result = await asyncio.wait_for(call, 20)
        assert text_of(result) == 'User response: action=accept, content={"response":"teal"}'
        # The session lives on for its owner.
        assert (await raw(registry, "POST", {"jsonrpc": "2.0", "id": 8, "method": "ping"}, session=session,
                          token="victim-token"))[0] == 200


async def test_a_client_that_changes_its_token_opens_a_new_session(registry):
    status, _ = await raw(registry, "POST", INITIALIZE, token="first")
    assert status == 200
    async with Caller(registry, "first").client as client:
        assert [t for t in (await client.list_tools()).tools if t.name == "toy__echo"]
    # The same session id with another credential is unknown: refreshing a token means a new session.
    caller = Caller(registry, "first")
    async with caller.client:
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        assert (await raw(registry, "POST", ping, session=caller.session_id, token="first"))[0] == 200
        assert (await raw(registry, "POST", ping, session=caller.session_id, token="second"))[0] == 404


async def ping(registry: str, session: str, token: str | None = None) -> int:
    return (await raw(registry, "POST", {"jsonrpc": "2.0", "id": 9, "method": "ping"}, session=session,
                      token=token))[0]


async def opened(registry: str, token: str | None = None) -> str:
    async with aiohttp.ClientSession() as http:
        headers = {**MCP_HEADERS, **({"Authorization": f"Bearer {token}"} if token else {})}
        async with http.post(f"{registry}/mcp", data=orjson.dumps(INITIALIZE), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            return resp.headers["Mcp-Session-Id"]


async def test_sessions_are_capped_per_caller_and_in_all_and_only_idle_ones_make_room(tmp_path):
    with registry_process(tmp_path, secret=SECRET, extra=["--max-sessions", "4",
                                                          "--max-sessions-per-caller", "2"]) as registry:
        first, second = await opened(registry), await opened(registry)
        status, body = await raw(registry, "POST", INITIALIZE)
        assert status == 429, body
        error = orjson.loads(body)["error"]
        assert "at most 2 per credential" in error["message"] and error["code"] == -32005
        # Other callers are not held back by the anonymous ones.
        alice = [await opened(registry, "alice"), await opened(registry, "alice")]
        assert (await raw(registry, "POST", INITIALIZE, token="alice"))[0] == 429
        # Full (4): a newcomer ends the least recently used idle session, the first anonymous one.
        assert await ping(registry, second) == 200
        bob = await opened(registry, "bob")
        assert await ping(registry, first) == 404
        assert await ping(registry, second) == 200
        assert [await ping(registry, s, "alice") for s in alice] == [200, 200]
        # A session with an open stream is never ended for room: with every session listening, newcomers wait.
        async with contextlib.AsyncExitStack() as stack:
            http = await stack.enter_async_context(aiohttp.ClientSession())
            for session, token in ((second, None), (alice[0], "alice"), (alice[1], "alice"), (bob, "bob")):
                headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session,
                           **({"Authorization": f"Bearer {token}"} if token else {})}
                stream = await stack.enter_async_context(http.get(f"{registry}/mcp", headers=headers))
                assert stream.status == 200
            status, body = await raw(registry, "POST", INITIALIZE, token="carol")
            assert status == 503 and b"maximum of 4 sessions" in body
        # Streams closed: room again, and the caller's own DELETE frees its slot at once.
        assert (await raw(registry, "DELETE", session=bob, token="bob"))[0] == 200
        await opened(registry, "carol")


async def sessions_open(registry: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{registry}/v1/gateway", headers={"Authorization": f"Bearer {SECRET}"}) as resp:
            assert resp.status == 200
            return await resp.json()


async def test_anonymous_sessions_expire_sooner_than_identified_ones(tmp_path):
    with registry_process(tmp_path, secret=SECRET, extra=["--anonymous-session-idle", "0.5"]) as registry:
        anonymous, identified = await opened(registry), await opened(registry, "alice")
        assert (await sessions_open(registry))["sessions"] == 2

        async def anonymous_gone():
            return (await sessions_open(registry))["anonymousSessions"] == 0

        await async_wait_until(anonymous_gone, timeout=10, what="the idle anonymous session to end")
        assert await ping(registry, anonymous) == 404
        assert await ping(registry, identified, "alice") == 200


async def test_a_huge_body_gets_413_and_a_batch_400(registry):
    async with aiohttp.ClientSession() as http:
        huge = b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"pad":"' + b"x" * (17 * 1024 * 1024) + b'"}}'
        async with http.post(f"{registry}/mcp", data=huge, headers=MCP_HEADERS) as resp:
            assert resp.status == 413
            assert "larger than" in (await resp.json())["error"]["message"]
        batch = [{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2, "method": "ping"}]
        async with http.post(f"{registry}/mcp", data=orjson.dumps(batch), headers=MCP_HEADERS) as resp:
            assert resp.status == 400
            assert "one JSON-RPC message per POST" in (await resp.json())["error"]["message"]


async def test_the_catalogue_is_read_only_with_the_heartbeat_credential(registry):
    async with aiohttp.ClientSession() as http:
        for path in ("/v1/tools", "/v1/servers", "/v1/gateway"):
            for headers in ({}, {"Authorization": "Bearer guess"}):
                async with http.get(f"{registry}{path}", headers=headers) as resp:
                    assert resp.status == 401, path
                    assert "toy__echo" not in await resp.text()
            async with http.get(f"{registry}{path}", headers={"Authorization": f"Bearer {SECRET}"}) as resp:
                assert resp.status == 200, path
        async with http.get(f"{registry}/v1/tools", headers={"Authorization": f"Bearer {SECRET}"}) as resp:
            assert "toy__echo" in {t["name"] for t in (await resp.json())["tools"]}


def test_a_registry_without_a_heartbeat_credential_refuses_to_start():
    result = toolmesh_cli("registry", "--listen", f"127.0.0.1:{free_port()}", timeout=30)
    assert result.returncode == 2, result.stderr
    assert "no heartbeat credential" in result.stderr and "--insecure" in result.stderr


async def test_a_workflows_results_are_for_the_credential_that_started_it(registry):
    workflow = {"tasks": [{"id": "a", "capability": "nobody-has-it", "timeoutSeconds": 1, "arguments": {}}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{registry}/v1/workflows", json=workflow,
                             headers={"Authorization": "Bearer alice"}) as resp:
            assert resp.status == 202
            run_id = (await resp.json())["id"]
        for headers in ({}, {"Authorization": "Bearer mallory"}):
            async with http.get(f"{registry}/v1/workflows/{run_id}", headers=headers) as resp:
                assert resp.status == 404
        async with http.get(f"{registry}/v1/workflows/{run_id}", headers={"Authorization": "Bearer alice"}) as resp:
            assert resp.status == 200 and (await resp.json())["id"] == run_id
