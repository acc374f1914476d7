"""Resumable SSE through the bridges: a client that lost a call's stream gets the rest with GET + Last-Event-ID.

A real SDK server (tests/helpers/servers/tools_server.py) runs behind the real
`toolmesh sidecar`, over stdio and over legacy HTTP+SSE; the client is raw
aiohttp, so every event id, priming event and `retry:` field is seen as sent.
Its `gated` tool reports progress, then waits for `open_gate` before reporting
more and answering, which holds a call mid-way without any timing.
"""

from __future__ import annotations

import contextlib
import itertools
import shlex
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from helpers import async_wait_until, free_port, port_open, running, wait_until
from helpers.sidecar import SidecarProcess, sidecar
from helpers.stdio_servers import STDIO_TOOLS, sse_tools_server

pytestmark = pytest.mark.timeout(120)

POST_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
MAX_EVENTS = 1000
"""Events a session keeps for resumption (sidecar/resumable.py)."""
MAX_BYTES = 4 << 20
"""Bytes of events a session keeps for resumption (sidecar/resumable.py)."""


@contextlib.contextmanager
def bridged(kind: str, tmp_path: Path, *args: str) -> Iterator[SidecarProcess]:
    """The tools server behind the sidecar, spawned over stdio or served over legacy HTTP+SSE."""
    if kind == "stdio":
        with sidecar(["--upstream-command", shlex.join(STDIO_TOOLS)], tmp_path, *args) as sc:
            yield sc
        return
    port = free_port()
    with running(sse_tools_server(port), log_path=tmp_path / f"sse-server-{port}.log"):
        wait_until(lambda: port_open(port), timeout=30, what="the SSE server to listen")
        upstream = ["--upstream", f"http://127.0.0.1:{port}/sse", "--upstream-transport", "sse"]
        with sidecar(upstream, tmp_path, *args) as sc:
            yield sc


@pytest.fixture(scope="module", params=["stdio", "legacy-sse"])
def bridge(request, tmp_path_factory):
    """A bridge whose calls wait long for a resume (they must never be cancelled in these tests)."""
    with bridged(request.param, tmp_path_factory.mktemp("resume"), "--sse-resume-grace", "120") as sc:
        yield sc


@dataclass
class Event:
    id: str | None
    data: str
    retry: int | None

    def message(self) -> dict[str, Any]:
        return orjson.loads(self.data)


class SseReader:
    """One SSE response, event by event."""

    def __init__(self, response: aiohttp.ClientResponse):
        self.response = response

    async def next(self) -> Event | None:
        """The next event, or None when the stream ended."""
        fields: dict[str, list[str]] = {}
        while True:
            line = await self.response.content.readline()
            if not line:
                return None
            text = line.decode().rstrip("\r\n")
            if not text:
                if fields:
                    retry = fields.get("retry")
                    return Event(id=fields.get("id", [None])[-1], data="\n".join(fields.get("data", [])),
                                 retry=int(retry[-1]) if retry else None)
                continue
            if text.startswith(":"):
                continue  # a keep-alive comment
            name, _, value = text.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)

    async def messages_until(self, done) -> list[Event]:
        """Events with data until `done(events)` holds (priming events are skipped)."""
        events: list[Event] = []
        while not done(events):
            event = await self.next()
            assert event is not None, f"the stream ended after {events}"
            if event.data:
                events.append(event)
        return events


def progress_of(events: list[Event]) -> list[float]:
    return [e.message()["params"]["progress"] for e in events if e.message().get("method") == "notifications/progress"]


def answers_to(events: list[Event], request_id: int) -> list[dict[str, Any]]:
    return [m for m in (e.message() for e in events) if m.get("id") == request_id and "method" not in m]


class RawClient:
    """One MCP session spoken with raw HTTP requests."""

    def __init__(self, http: aiohttp.ClientSession, url: str):
        self.http = http
        self.url = url
        self.session_id = ""
        self._ids = itertools.count(100)

    @property
    def headers(self) -> dict[str, str]:
        return {**POST_HEADERS, "Mcp-Session-Id": self.session_id, "MCP-Protocol-Version": "2025-11-25"}

    async def open(self) -> RawClient:
        async with self.http.post(self.url, headers=POST_HEADERS, data=orjson.dumps({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "resume-test", "version": "1"}}})) as response:
            assert response.status == 200, await response.text()
            self.session_id = response.headers["Mcp-Session-Id"]
        async with self.http.post(self.url, headers=self.headers, data=orjson.dumps(
                {"jsonrpc": "2.0", "method": "notifications/initialized"})) as response:
            assert response.status == 202
        return self

    async def start_call(self, request_id: int, tool: str, arguments: dict[str, Any]) -> SseReader:
        """A tools/call with a progress token whose answer is an SSE stream, left open for the test to read."""
        response = await self.http.post(self.url, headers=self.headers, data=orjson.dumps({
            "jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": {"progressToken": f"token-{request_id}"}}}))
        assert response.status == 200 and response.content_type == "text/event-stream", await response.text()
        return SseReader(response)

    async def call(self, tool: str, arguments: dict[str, Any]) -> str:
        """A tools/call answered as a whole; the text of its result."""
        request_id = next(self._ids)
        async with self.http.post(self.url, headers=self.headers, data=orjson.dumps({
                "jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                "params": {"name": tool, "arguments": arguments}})) as response:
            assert response.status == 200
            if response.content_type == "application/json":
                answer = orjson.loads(await response.read())
            else:
                events = await SseReader(response).messages_until(lambda ev: answers_to(ev, request_id))
                answer = answers_to(events, request_id)[0]
        return "".join(c["text"] for c in answer["result"]["content"])

    async def resume(self, last_event_id: str) -> aiohttp.ClientResponse:
        return await self.http.get(self.url, headers={
            "Accept": "text/event-stream", "Mcp-Session-Id": self.session_id, "MCP-Protocol-Version": "2025-11-25",
            "Last-Event-ID": last_event_id})


def seq_of(event_id: str) -> tuple[str, int]:
    stream, _, seq = event_id.partition("-")
    return stream, int(seq)


async def test_a_call_whose_stream_dropped_resumes_with_every_event_and_its_result_once(bridge):
    name = uuid.uuid4().hex
    async with aiohttp.ClientSession() as http:
        client = await RawClient(http, bridge.url).open()
        first = await client.start_call(7, "gated", {"name": name, "before": 3, "after": 2})
        priming = await first.next()
        assert priming is not None and priming.data == "" and priming.id and priming.retry == 1000
        sent = await first.messages_until(lambda ev: len(ev) == 3)
        assert progress_of(sent) == [1, 2, 3] and all(e.id for e in sent)
        # The connection drops: the client kept the first two notifications, the third was lost on the way.
        first.response.close()
        received, last_seen = sent[:2], sent[1].id

        resumed_response = await client.resume(last_seen)
        assert resumed_response.status == 200 and resumed_response.content_type == "text/event-stream"
        resumed = SseReader(resumed_response)
        replayed = await resumed.messages_until(lambda ev: len(ev) == 1)
        assert progress_of(replayed) == [3]
        # The call is still running upstream: it goes on now, and the rest arrives on the resumed stream.
        assert await client.call("open_gate", {"name": name}) == f"opened {name}"
        rest = await resumed.messages_until(lambda ev: answers_to(ev, 7))
        assert await resumed.next() is None, "the resumed stream ends after the call's answer"
        resumed_response.close()

    events = received + replayed + rest
    assert progress_of(events) == [1, 2, 3, 4, 5]
    assert {e.message()["params"]["progressToken"] for e in events if "method" in e.message()} == {"token-7"}
    (answer,) = answers_to(events, 7)
    assert answer["result"]["content"][0]["text"] == f"gated {name} done"
    stream = seq_of(priming.id)[0]
    ids = [seq_of(e.id) for e in events]
    assert {s for s, _ in ids} == {stream}, "a resume replays that stream's events only"
    assert [n for _, n in ids] == sorted({n for _, n in ids}), "ids are unique and in order"


async def test_the_get_stream_resumes_with_the_notifications_it_missed(bridge):
    async with aiohttp.ClientSession() as http:
        client = await RawClient(http, bridge.url).open()
        stream = await http.get(bridge.url, headers={"Accept": "text/event-stream",
                                                     "Mcp-Session-Id": client.session_id})
        assert stream.status == 200
        reader = SseReader(stream)
        priming = await reader.next()
        assert priming is not None and priming.data == "" and priming.retry == 1000
        await client.call("grow", {"name": f"tool_{uuid.uuid4().hex[:8]}"})
        (seen,) = await reader.messages_until(lambda ev: len(ev) == 1)
        assert seen.message()["method"] == "notifications/tools/list_changed"
        stream.close()
        for _ in range(2):
            await client.call("grow", {"name": f"tool_{uuid.uuid4().hex[:8]}"})
        resumed = await client.resume(seen.id)
        assert resumed.status == 200
        missed = await SseReader(resumed).messages_until(lambda ev: len(ev) == 2)
        resumed.close()
    assert [e.message()["method"] for e in missed] == ["notifications/tools/list_changed"] * 2
    assert seq_of(missed[0].id)[1] > seq_of(seen.id)[1] and missed[0].id != missed[1].id


@pytest.mark.parametrize("last_event_id", ["999-999999", "0-999999999", "not-an-id", "17"])
async def test_an_unknown_last_event_id_is_refused_clearly_and_the_session_goes_on(bridge, last_event_id):
    async with aiohttp.ClientSession() as http:
        client = await RawClient(http, bridge.url).open()
        async with await client.resume(last_event_id) as response:
            assert response.status == 400
            error = orjson.loads(await response.read())["error"]
        assert "Last-Event-ID" in error["message"]
        assert await client.call("echo", {"text": "still here"}) == "still here"


@pytest.mark.parametrize(("steps", "size"), [(MAX_EVENTS + 100, 0), (80, 64 * 1024)],
                         ids=["more-events-than-kept", "more-bytes-than-kept"])
async def test_the_resume_buffer_is_bounded_and_an_expired_id_says_so(bridge, steps, size):
    assert steps > MAX_EVENTS or steps * size > MAX_BYTES
    name = uuid.uuid4().hex
    async with aiohttp.ClientSession() as http:
        client = await RawClient(http, bridge.url).open()
        call = await client.start_call(8, "gated", {"name": name, "before": steps, "after": 0, "size": size})
        sent = await call.messages_until(lambda ev: len(ev) == steps)
        call.response.close()
        # The oldest events were dropped to keep the session's buffer within its bounds.
        async with await client.resume(sent[0].id) as response:
            assert response.status == 400
            assert "expired" in orjson.loads(await response.read())["error"]["message"]
        # Recent ones are still there, and the call (never cancelled) still answers on the resumed stream.
        resumed_response = await client.resume(sent[-4].id)
        assert resumed_response.status == 200
        resumed = SseReader(resumed_response)
        replayed = await resumed.messages_until(lambda ev: len(ev) == 3)
        assert await client.call("open_gate", {"name": name}) == f"opened {name}"
        rest = await resumed.messages_until(lambda ev: answers_to(ev, 8))
        resumed_response.close()
    assert progress_of(replayed) == [steps - 2, steps - 1, steps]
    assert answers_to(rest, 8)[0]["result"]["content"][0]["text"] == f"gated {name} done"


@pytest.mark.parametrize("kind", ["stdio", "legacy-sse"])
async def test_a_call_whose_client_never_comes_back_is_cancelled_upstream_after_the_grace(tmp_path, kind):
    name = uuid.uuid4().hex
    with bridged(kind, tmp_path, "--sse-resume-grace", "0.2") as sc:
        async with aiohttp.ClientSession() as http:
            client = await RawClient(http, sc.url).open()
            call = await client.start_call(9, "gated", {"name": name, "before": 1, "after": 1})
            (progress,) = await call.messages_until(lambda ev: len(ev) == 1)
            call.response.close()
            # Answered only once the server saw the call cancelled.
            assert await client.call("wait_cancelled", {"name": name}) == f"{name} was cancelled"
            # A late resume gets what was sent and an ended stream: no answer is coming, and nothing hangs.
            async with await client.resume(progress.id) as response:
                assert response.status == 200
                reader = SseReader(response)
                late = [e async for e in _all(reader)]
            assert answers_to([e for e in late if e.data], 9) == []


async def _all(reader: SseReader):
    while (event := await reader.next()) is not None:
        yield event


@pytest.mark.parametrize("kind", ["stdio", "legacy-sse"])
async def test_no_replay_while_the_policy_budgets_results(tmp_path, kind):
    """Logged answers are the server's, before the policy chain: under a budget a resume would hand out an
    untruncated, unbudgeted result. So the stream ends with its client, the call is cancelled, and a resume is
    refused, until a policy without auth, authorization or budget is in force again."""
    policy = tmp_path / "policy.yaml"
    budgeted = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": "budgeted"},
                "spec": {"budget": {"totalTokens": 100000}}}
    policy.write_text(orjson.dumps(budgeted).decode())  # JSON is YAML
    name = uuid.uuid4().hex
    with bridged(kind, tmp_path, "--sse-resume-grace", "120", "--policy", str(policy)) as sc:
        async with aiohttp.ClientSession() as http:
            client = await RawClient(http, sc.url).open()
            call = await client.start_call(11, "gated", {"name": name, "before": 1, "after": 1})
            (progress,) = await call.messages_until(lambda ev: len(ev) == 1)
            assert progress.id is None, "no event ids: nothing to resume from"
            call.response.close()
            # A 120 s grace would keep it running: the budget policy ends it with its client instead.
            assert await client.call("wait_cancelled", {"name": name}) == f"{name} was cancelled"
            async with await client.resume("1-1") as response:
                assert response.status == 400
                assert "not resumable" in orjson.loads(await response.read())["error"]["message"]

            # A policy without auth, authorization or budget: resuming works again.
            policy.write_text(orjson.dumps({**budgeted, "spec": {"cache": {"ttlSeconds": 5}}}).decode())

            async def reloaded():
                return "policy reloaded" in sc.log()

            await async_wait_until(reloaded, timeout=30, what="the sidecar to load the new policy")
            again = await client.start_call(12, "gated", {"name": name + "-2", "before": 1, "after": 1})
            assert (await again.next()).retry == 1000, "a priming event: the stream is resumable"
            (seen,) = await again.messages_until(lambda ev: len(ev) == 1)
            again.response.close()
            resumed = await client.resume(seen.id)
            assert resumed.status == 200
            assert await client.call("open_gate", {"name": name + "-2"}) == f"opened {name}-2"
            rest = await SseReader(resumed).messages_until(lambda ev: answers_to(ev, 12))
            resumed.close()
        assert answers_to(rest, 12)[0]["result"]["content"][0]["text"] == f"gated {name}-2 done"
