"""One bridge session attacking another: answering its server requests, cancelling its calls, replaying its
stream, ending it; and the bridge's own bounds (unguessable ids, a session cap, idle sessions swept on a timer).

A real SDK server (tests/helpers/servers/tools_server.py) runs behind the stdio bridge and, where the attack
applies to it too, behind the legacy HTTP+SSE adapter; both are driven through the `Upstream` interface as the
HTTP layer would relay each session's requests, and the session cap also through the real `toolmesh sidecar`.
Authentication (which principal may name which session) is the HTTP layer's: here the attacker knows its own
session id and guesses or learns everything else, which is what the bridge itself must withstand.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from helpers import async_wait_until, free_port, port_open, running, wait_until
from helpers.sidecar import sidecar
from helpers.stdio_servers import SAMPLING, STDIO_TOOLS, UpstreamClient, sse_tools_server, text_of
from toolmesh.api.sessions import session_ref
from toolmesh.sidecar.transports.legacy_sse import LegacySseUpstream
from toolmesh.sidecar.transports.stdio import StdioUpstream

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def sse_server_url(tmp_path_factory):
    port = free_port()
    with running(sse_tools_server(port), log_path=tmp_path_factory.mktemp("sse") / "server.log"):
        wait_until(lambda: port_open(port), timeout=30, what="the SSE server to listen")
        yield f"http://127.0.0.1:{port}/sse"


@pytest.fixture(params=["stdio", "legacy-sse"])
async def bridge(request):
    """The tools server behind either bridge; calls wait long for a resume (they are never cancelled by one)."""
    if request.param == "stdio":
        upstream = StdioUpstream(STDIO_TOOLS, start_timeout=20, resume_grace=120)
    else:
        upstream = LegacySseUpstream(request.getfixturevalue("sse_server_url"), resume_grace=120)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


@pytest.fixture
async def stdio_bridge():
    upstream = StdioUpstream(STDIO_TOOLS, start_timeout=20)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


def message(request_id: Any, method: str, **params: Any) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})


def gated_call(request_id: Any, name: str, before: int = 1, after: int = 1) -> bytes:
    """A `gated` call with a progress token: answered with SSE, held mid-way until `open_gate(name)`."""
    return message(request_id, "tools/call", name="gated", arguments={"name": name, "before": before, "after": after},
                   _meta={"progressToken": f"token-{request_id}"})


async def data_events(response: Any) -> AsyncIterator[tuple[str | None, dict[str, Any]]]:
    """(event id, message) of each event with data on an SSE answer (priming events carry only an id)."""
    assert response.events is not None, response
    async for event in response.events:
        if event.data:
            yield event.id, orjson.loads(event.data)


async def take(events: AsyncIterator[tuple[str | None, dict[str, Any]]], count: int) -> list[tuple[str | None, dict]]:
    return [await anext(events) for _ in range(count)]


async def until_answer(events: AsyncIterator[tuple[str | None, dict[str, Any]]], request_id: Any) -> list[dict]:
    """Messages up to and including the response to `request_id`."""
    seen = []
    async for _, incoming in events:
        seen.append(incoming)
        if incoming.get("id") == request_id and "method" not in incoming:
            return seen
    raise AssertionError(f"the stream ended before the answer to {request_id}: {seen}")


# -- server requests ----------------------------------------------------------------------------------------------


async def test_a_sampling_request_is_answered_only_by_the_session_it_went_to(bridge, caplog):
    caplog.set_level(logging.DEBUG, logger="toolmesh.sidecar.multiplex")
    attacker = UpstreamClient(bridge, capabilities=SAMPLING)
    await attacker.initialize()
    forged: list[int] = []
    seen_ids: list[Any] = []

    async def model(request: dict) -> dict:
        seen_ids.append(request["id"])
        # Before the victim answers, the attacker answers: with the id the victim saw (leaked, say), with every
        # small integer a server numbers its requests with, and without any session at all.
        guesses = [request["id"], *range(0, 20), *(str(n) for n in range(0, 20))]
        for guess in guesses:
            reply = orjson.dumps({"jsonrpc": "2.0", "id": guess, "result": {
                "role": "assistant", "content": {"type": "text", "text": "forged"}, "model": "x",
                "stopReason": "endTurn"}})
            forged.append((await bridge.post(reply, attacker.headers)).status)
            without_session = {k: v for k, v in attacker.headers.items() if k != "Mcp-Session-Id"}
            forged.append((await bridge.post(reply, without_session)).status)
        question = request["params"]["messages"][0]["content"]["text"]
        return {"role": "assistant", "content": {"type": "text", "text": f"genuine answer to {question}"},
                "model": "test-model", "stopReason": "endTurn"}

    victim = UpstreamClient(bridge, capabilities=SAMPLING, on_server_request=model)
    await victim.initialize()
    answer = await victim.call_tool("ask_model", {"question": "why?"})
    assert text_of(answer) == "genuine answer to why?"
    assert forged and set(forged) == {202}, "a forged answer is acknowledged like any, and goes nowhere"
    (bridge_id,) = seen_ids
    assert isinstance(bridge_id, str) and len(bridge_id) >= 22, "the client sees an unguessable id, not the server's"
    assert "dropped an answer from session" in caplog.text
    assert attacker.session_id not in caplog.text and victim.session_id not in caplog.text
    assert session_ref(attacker.session_id) in caplog.text


# -- cancellation -------------------------------------------------------------------------------------------------


async def test_a_cancellation_naming_another_sessions_request_id_cancels_only_the_senders_own(bridge):
    victim, attacker = UpstreamClient(bridge), UpstreamClient(bridge)
    await victim.initialize()
    await attacker.initialize()
    victims_gate, attackers_gate = uuid.uuid4().hex, uuid.uuid4().hex
    victims = data_events(await bridge.post(gated_call(5, victims_gate), victim.headers))
    attackers = data_events(await bridge.post(gated_call(5, attackers_gate), attacker.headers))
    await take(victims, 1)
    await take(attackers, 1)

    cancel = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 5}})
    assert (await bridge.post(cancel, attacker.headers)).status == 202
    # The attacker's own call 5 was withdrawn: the child saw it cancelled, and its stream ends without an answer.
    assert text_of(await attacker.call_tool("wait_cancelled", {"name": attackers_gate})) == \
        f"{attackers_gate} was cancelled"
    assert [m async for _, m in attackers] == []
    # The victim's call 5 runs on and answers.
    assert text_of(await attacker.call_tool("open_gate", {"name": victims_gate})) == f"opened {victims_gate}"
    rest = await until_answer(victims, 5)
    assert text_of(rest[-1]) == f"gated {victims_gate} done"
    assert {m["params"]["progressToken"] for m in rest[:-1]} == {"token-5"}


# -- resumption ---------------------------------------------------------------------------------------------------


async def test_another_sessions_last_event_id_never_replays_its_events(bridge):
    victim, attacker = UpstreamClient(bridge), UpstreamClient(bridge)
    await victim.initialize()
    await attacker.initialize()
    victims_gate, attackers_gate = uuid.uuid4().hex, uuid.uuid4().hex
    victim_call = await bridge.post(gated_call(7, victims_gate, before=3), victim.headers)
    victims = data_events(victim_call)
    sent = await take(victims, 3)
    await victim_call.release()  # the victim lost its stream; its call runs on for a resume
    # The attacker has a stream of its own numbered like the victim's, so the victim's ids parse in its session too.
    attacker_call = await bridge.post(gated_call(8, attackers_gate, before=1), attacker.headers)
    attackers = data_events(attacker_call)
    await take(attackers, 1)

    for event_id, _ in sent:
        answer = await bridge.get({**attacker.headers, "Last-Event-ID": event_id})
        if answer.status == 200:
            replayed = []
            reader = asyncio.ensure_future(_collect(answer, replayed))
            await attacker.call_tool("open_gate", {"name": attackers_gate})
            await asyncio.wait_for(reader, 30)
            # Whatever a resume in the attacker's session replays is the attacker's own call, never the victim's.
            assert all(m["params"]["progressToken"] == "token-8" for m in replayed if "method" in m), replayed
            assert all(m["id"] == 8 and text_of(m) == f"gated {attackers_gate} done"
                       for m in replayed if "method" not in m), replayed
        else:
            assert answer.status == 400, answer
    # The victim's own resume still gets what it missed, and the answer.
    resumed = await bridge.get({**victim.headers, "Last-Event-ID": sent[0][0]})
    assert resumed.status == 200
    resumed_events = data_events(resumed)
    missed = await take(resumed_events, 2)
    assert [m["params"]["progress"] for _, m in missed] == [2, 3]
    await victim.call_tool("open_gate", {"name": victims_gate})
    assert text_of((await until_answer(resumed_events, 7))[-1]) == f"gated {victims_gate} done"


async def _collect(response: Any, into: list[dict]) -> None:
    async for _, incoming in data_events(response):
        into.append(incoming)


# -- DELETE -------------------------------------------------------------------------------------------------------


async def test_delete_ends_the_named_session_only(bridge):
    victim, attacker = UpstreamClient(bridge), UpstreamClient(bridge)
    await victim.initialize()
    await attacker.initialize()
    gate = uuid.uuid4().hex
    victims = data_events(await bridge.post(gated_call(3, gate), victim.headers))
    await take(victims, 1)
    victims_stream = await bridge.get(victim.headers)
    assert victims_stream.status == 200

    made_up = {**attacker.headers, "Mcp-Session-Id": uuid.uuid4().hex}
    assert (await bridge.delete(made_up)).status == 404
    assert (await bridge.delete(attacker.headers)).status == 200
    assert (await bridge.post(message(1, "ping"), attacker.headers)).status == 404

    # The victim's session, its call in flight and its GET stream are all still there.
    assert (await victim.request("ping"))["result"] == {}
    await victim.call_tool("open_gate", {"name": gate})
    assert text_of((await until_answer(victims, 3))[-1]) == f"gated {gate} done"
    listening = asyncio.ensure_future(anext(data_events(victims_stream)))
    await victim.call_tool("grow", {"name": f"tool_{uuid.uuid4().hex[:8]}"})
    _, heard = await asyncio.wait_for(listening, 30)
    assert heard["method"] == "notifications/tools/list_changed"
    await victims_stream.release()


# -- the bridge's own bounds --------------------------------------------------------------------------------------


async def test_session_ids_are_unguessable(stdio_bridge):
    clients = [UpstreamClient(stdio_bridge) for _ in range(50)]
    for client in clients:
        await client.initialize()
    ids = [client.session_id for client in clients]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22,}", i) for i in ids), ids[:3]
    # No shared prefix a counter or clock would leave.
    assert len({i[:4] for i in ids}) > 40


async def test_at_the_cap_the_least_recently_used_idle_session_makes_room_else_initialize_is_refused(caplog):
    caplog.set_level(logging.INFO, logger="toolmesh.sidecar")
    upstream = StdioUpstream(STDIO_TOOLS, start_timeout=20, max_sessions=3)
    await upstream.start()
    try:
        calling, idle, listening = (UpstreamClient(upstream) for _ in range(3))
        for client in (calling, idle, listening):
            await client.initialize()
        gate = uuid.uuid4().hex
        call = data_events(await upstream.post(gated_call(1, gate), calling.headers))
        await take(call, 1)
        stream = await upstream.get(listening.headers)
        # `calling` is the least recently used, but busy: the idle one goes.
        newcomer = UpstreamClient(upstream)
        await newcomer.initialize()
        assert (await upstream.post(message(1, "ping"), idle.headers)).status == 404
        assert session_ref(idle.session_id) in caplog.text and idle.session_id not in caplog.text
        newcomers_stream = await upstream.get(newcomer.headers)

        refused = await upstream.post(message(0, "initialize", protocolVersion="2025-11-25", capabilities={},
                                              clientInfo={"name": "late", "version": "1"}), {})
        assert refused.status == 503
        error = orjson.loads(refused.body)["error"]
        assert "--max-sessions" in error["message"] and error["data"] == {"maxSessions": 3}
        # Nobody busy lost anything.
        for client in (calling, listening, newcomer):
            assert (await client.request("ping"))["result"] == {}
        await calling.call_tool("open_gate", {"name": gate})
        assert text_of((await until_answer(call, 1))[-1]) == f"gated {gate} done"
        # Once a session is idle again, there is room again.
        await newcomers_stream.release()
        await UpstreamClient(upstream).initialize()
        await stream.release()
    finally:
        await upstream.close()


async def test_idle_sessions_are_swept_on_a_timer_without_any_new_initialize():
    upstream = StdioUpstream(STDIO_TOOLS, start_timeout=20, session_idle_timeout=0.3)
    await upstream.start()
    try:
        left, listening = UpstreamClient(upstream), UpstreamClient(upstream)
        await left.initialize()
        await listening.initialize()
        stream = await upstream.get(listening.headers)  # an open stream keeps its session

        async def forgotten() -> bool:
            return left.session_id not in upstream.mux.sessions

        await async_wait_until(forgotten, timeout=10, what="the idle session to be swept")
        assert (await upstream.post(message(1, "ping"), left.headers)).status == 404
        assert (await listening.request("ping"))["result"] == {}
        await stream.release()
    finally:
        await upstream.close()


async def test_the_sidecar_refuses_a_session_over_max_sessions_with_503_naming_the_cap(tmp_path):
    with sidecar(["--upstream-command", shlex.join(STDIO_TOOLS)], tmp_path, "--max-sessions", "2") as sc:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        initialize = message(0, "initialize", protocolVersion="2025-11-25", capabilities={},
                             clientInfo={"name": "cap", "version": "1"})
        async with aiohttp.ClientSession() as http:
            streams = []
            for _ in range(2):
                async with http.post(sc.url, headers=headers, data=initialize) as response:
                    assert response.status == 200
                    session_id = response.headers["Mcp-Session-Id"]
                stream = await http.get(sc.url, headers={"Accept": "text/event-stream", "Mcp-Session-Id": session_id})
                assert stream.status == 200
                await stream.content.readline()  # the priming event: the stream is open at the bridge
                streams.append(stream)
            async with http.post(sc.url, headers=headers, data=initialize) as response:
                assert response.status == 503
                error = orjson.loads(await response.read())["error"]
            for stream in streams:
                stream.close()
    assert "--max-sessions" in error["message"] and "at most 2" in error["message"]
