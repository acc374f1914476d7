"""The multiplexer under any interleaving of two or three sessions' calls, server requests, answers from any
session, cancellations and deletes: a session never receives another's events and never settles another's request.

Hypothesis draws the sessions (with or without the sampling capability) and a sequence of steps; a model of
what each step may cause (which call may end, which cancellation and which answer may reach the server) is kept
beside the real `Multiplexer`, whose upstream end is the test channel. Everything runs in-process on one event
loop with no wall time: after each step the loop runs until nothing is ready, then every message the step caused,
upstream or on any session's stream, is checked against the model.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.mux import Channel, request
from toolmesh.sidecar.errors import ProxyError
from toolmesh.sidecar.transports.channel import Multiplexer
from toolmesh.sidecar.transports.sessions import ClientSession

CLIENT_IDS = st.sampled_from([1, 2, "a"])
"""Ids every session uses, so they collide across sessions as real clients' do."""
GUESSES = st.sampled_from([0, 1, 2, 3, "0", "1", "srv-0"])
"""Ids an attacker tries when answering a server request it was not sent (a server numbers its own 0, 1, 2...)."""
_TURNS = 30
"""Turns of the event loop after a step: enough for every ready task to run to its next wait (no wall time passes)."""


def steps(sessions: int) -> st.SearchStrategy[list[tuple]]:
    session = st.integers(0, sessions - 1)
    pick = st.integers(0, 50)
    return st.lists(st.one_of(
        st.tuples(st.just("call"), session, CLIENT_IDS),
        st.tuples(st.just("progress"), pick),
        st.tuples(st.just("reply"), pick),
        st.tuples(st.just("server_request"), st.booleans()),
        st.tuples(st.just("answer"), session, pick),
        st.tuples(st.just("guess"), session, GUESSES),
        st.tuples(st.just("server_cancel"), pick),
        st.tuples(st.just("cancel"), session, CLIENT_IDS),
        st.tuples(st.just("delete"), session),
        st.tuples(st.just("broadcast")),
    ), min_size=1, max_size=40)


@dataclass
class Call:
    n: int
    owner: int
    client_id: Any
    upstream_id: int | None = None
    upstream_token: Any = None
    ended: str | None = None
    """How the client saw it end: "answered", "withdrawn" (202 or a stream ending with no answer), "failed"."""
    may_end: set[str] = field(default_factory=set)
    """What may end it by now: "replied" (the server answered), "cancelled" (its own session), "deleted"."""
    open_upstream: bool = True
    """The server still works on it (not answered, cancelled or abandoned)."""


@dataclass
class ServerRequest:
    tag: int
    server_id: int
    recipient: int | None = None
    bridge_id: Any = None
    outstanding: bool = True


class Harness:
    def __init__(self, capable: list[bool]):
        self.channel = Channel()
        self.mux = Multiplexer(self.channel.send)
        self.sessions: list[ClientSession] = [
            self.mux.new_session({"capabilities": {"sampling": {}} if able else {}}) for able in capable]
        self.alive = [True] * len(capable)
        self.calls: list[Call] = []
        self.server_requests: list[ServerRequest] = []
        self.violations: list[str] = []
        self.tasks: list[asyncio.Task] = []
        self.expected_upstream: list[dict] = []
        """Messages the step under way may rightly send upstream (each at most once)."""
        self.next_server_id = itertools.count()
        self.next_tag = itertools.count()
        for index, session in enumerate(self.sessions):
            self.tasks.append(asyncio.create_task(self._read_get(index, self.mux.open_stream(session))))

    # -- what sessions receive ----------------------------------------------------------------------------------

    def _wrong(self, what: str) -> None:
        self.violations.append(what)

    async def _read_get(self, index: int, response: Any) -> None:
        async for event in response.events:
            if event.data:
                self._received(index, None, orjson.loads(event.data))

    def _received(self, index: int, call: Call | None, message: dict) -> None:
        """A message on session `index`'s GET stream (call None) or on `call`'s response stream."""
        if not self.alive[index]:
            self._wrong(f"session {index} received {message} after it was deleted")
        method = message.get("method")
        if method == "sampling/createMessage":
            tag = message["params"]["tag"]
            sr = self.server_requests[tag]
            if sr.recipient is not None:
                self._wrong(f"server request {tag} delivered twice (to {sr.recipient} and {index})")
            if "sampling" not in self.sessions[index].capabilities:
                self._wrong(f"server request {tag} went to session {index}, which cannot sample")
            sr.recipient, sr.bridge_id = index, message["id"]
        elif method == "notifications/progress":
            params = message["params"]
            if call is None or params["owner"] != index or params["progressToken"] != f"t{call.client_id}":
                self._wrong(f"session {index} got progress {params} on {call}")
        elif method == "notifications/cancelled":
            owner = [sr for sr in self.server_requests if sr.bridge_id == message["params"]["requestId"]]
            if len(owner) != 1 or owner[0].recipient != index:
                self._wrong(f"session {index} was told a server request it never got was withdrawn: {message}")
        elif method == "notifications/tools/list_changed":
            pass
        elif method is None:
            result = message.get("result") or {}
            if call is None or message.get("id") != call.client_id or result.get("owner") != index \
                    or result.get("n") != call.n:
                self._wrong(f"session {index} got answer {message} on {call}")
            elif call is not None:
                self._end(call, "answered")
        else:
            self._wrong(f"session {index} got an unexpected {message}")

    def _end(self, call: Call, how: str) -> None:
        if call.ended is not None:
            self._wrong(f"call {call.n} ended twice ({call.ended}, then {how})")
        call.ended = how
        allowed = {"answered": {"replied"}, "withdrawn": {"cancelled", "deleted"},
                   "failed": set()}[how]
        if not call.may_end & allowed:
            self._wrong(f"call {call.n} of session {call.owner} ended {how}, but only {call.may_end} happened to it")

    async def _run_call(self, call: Call) -> None:
        message = request(call.client_id, name="tool", owner=call.owner, n=call.n,
                          _meta={"progressToken": f"t{call.client_id}"})
        try:
            response = await self.mux.post(message, self.sessions[call.owner])
        except ProxyError as exc:
            self._end(call, "failed")
            self._wrong(f"call {call.n} failed: {exc.message}")
            return
        if response.body is not None:
            self._received(call.owner, call, orjson.loads(response.body))
            return
        if response.events is None:
            self._end(call, "withdrawn")
            return
        async for event in response.events:
            if event.data:
                self._received(call.owner, call, orjson.loads(event.data))
        if call.ended is None:
            self._end(call, "withdrawn")

    # -- steps --------------------------------------------------------------------------------------------------

    def in_flight(self, index: int, client_id: Any) -> Call | None:
        return next((c for c in self.calls if c.owner == index and c.client_id == client_id and c.ended is None
                     and c.upstream_id is not None and "cancelled" not in c.may_end and "deleted" not in c.may_end),
                    None)

    async def step(self, op: tuple) -> None:
        kind, *args = op
        mux = self.mux
        if kind == "call":
            index, client_id = args
            if not self.alive[index] or self.in_flight(index, client_id) is not None:
                return  # (a client never reuses an id in flight; a deleted session posts nothing: the HTTP layer 404s)
            call = Call(len(self.calls), index, client_id)
            self.calls.append(call)
            self.tasks.append(asyncio.create_task(self._run_call(call)))
            await self.quiesce()
            sent = self.channel.sent.pop(0)
            call.upstream_id, call.upstream_token = sent["id"], sent["params"]["_meta"]["progressToken"]
            if sent["params"]["owner"] != index or sent["params"]["n"] != call.n:
                self._wrong(f"call {call.n} went upstream as {sent}")
        elif kind in ("progress", "reply"):
            sent = [c for c in self.calls if c.upstream_id is not None]
            if not sent:
                return
            call = sent[args[0] % len(sent)]
            if kind == "progress":
                mux.receive(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": {
                    "progressToken": call.upstream_token, "progress": 1, "owner": call.owner}}))
            else:
                if call.open_upstream:
                    call.may_end.add("replied")
                    call.open_upstream = False
                mux.receive(orjson.dumps({"jsonrpc": "2.0", "id": call.upstream_id,
                                          "result": {"owner": call.owner, "n": call.n}}))
        elif kind == "server_request":
            tag = next(self.next_tag)
            sr = ServerRequest(tag, next(self.next_server_id))
            self.server_requests.append(sr)
            mux.receive(orjson.dumps({"jsonrpc": "2.0", "id": sr.server_id, "method": "sampling/createMessage",
                                      "params": {"tag": tag}}))
            await self.quiesce()
            if sr.recipient is None:
                # Nobody able to answer: the bridge says so to the server, on the client's behalf.
                sr.outstanding = False
                self.expected_upstream.append({"id": sr.server_id, "refused": True})
        elif kind in ("answer", "guess"):
            index = args[0]
            if not self.alive[index]:
                return
            if kind == "answer":
                delivered = [sr for sr in self.server_requests if sr.recipient is not None]
                if not delivered:
                    return
                sr = delivered[args[1] % len(delivered)]
                answer_id = sr.bridge_id
                if sr.outstanding and sr.recipient == index:
                    sr.outstanding = False
                    self.expected_upstream.append({"jsonrpc": "2.0", "id": sr.server_id, "result": {"by": index}})
            else:
                answer_id = args[1]
            status = (await mux.post({"jsonrpc": "2.0", "id": answer_id, "result": {"by": index}},
                                     self.sessions[index])).status
            if status != 202:
                self._wrong(f"an answer was not acknowledged with 202 but {status}")
        elif kind == "server_cancel":
            outstanding = [sr for sr in self.server_requests if sr.outstanding]
            if not outstanding:
                return
            sr = outstanding[args[0] % len(outstanding)]
            sr.outstanding = False
            mux.receive(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                      "params": {"requestId": sr.server_id}}))
        elif kind == "cancel":
            index, client_id = args
            if not self.alive[index]:
                return
            call = self.in_flight(index, client_id)
            if call is not None and call.open_upstream:
                call.may_end.add("cancelled")
                call.open_upstream = False
                self.expected_upstream.append({"cancel": call.upstream_id})
            await mux.post({"jsonrpc": "2.0", "method": "notifications/cancelled",
                            "params": {"requestId": client_id}}, self.sessions[index])
        elif kind == "delete":
            (index,) = args
            if not self.alive[index]:
                return
            for call in self.calls:
                if call.owner == index and call.ended is None:
                    call.may_end.add("deleted")
                    if call.open_upstream:
                        call.open_upstream = False
                        self.expected_upstream.append({"cancel": call.upstream_id})
            for sr in self.server_requests:
                if sr.recipient == index:
                    sr.outstanding = False
            await mux.end_session(self.sessions[index])
            self.alive[index] = False
        elif kind == "broadcast":
            mux.receive(b'{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}')
        await self.quiesce()
        self._check_upstream()

    async def quiesce(self) -> None:
        for _ in range(_TURNS):
            await asyncio.sleep(0)

    def _check_upstream(self) -> None:
        """What reached the server during the step is exactly what the model allows."""
        expected, self.expected_upstream = self.expected_upstream, []
        for sent in self.channel.sent:
            if sent.get("method") == "notifications/cancelled":
                key = {"cancel": sent["params"]["requestId"]}
            elif "error" in sent:
                key = {"id": sent["id"], "refused": True}
            else:
                key = sent
            if key in expected:
                expected.remove(key)
            else:
                self._wrong(f"the server got {sent}, which no step allowed")
        self.channel.sent.clear()
        for missing in expected:
            self._wrong(f"the server never got {missing}")

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _play(capable: list[bool], ops: list[tuple]) -> list[str]:
    harness = Harness(capable)
    try:
        for op in ops:
            await harness.step(op)
            if harness.violations:
                break
    finally:
        await harness.close()
    return harness.violations


@st.composite
def scenarios(draw):
    capable = draw(st.lists(st.booleans(), min_size=2, max_size=3))
    return capable, draw(steps(len(capable)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_no_session_sees_or_settles_anything_of_another(scenario):
    capable, ops = scenario
    assert asyncio.run(_play(capable, ops)) == []


def test_an_attacker_guessing_a_servers_request_id_is_caught():
    """The property can fail: the scenario it exists for (a second session answering a sampling request by
    guessing the server's small integer id) is played here on its own."""
    ops = [("call", 0, 1), ("server_request", True), ("guess", 1, 0), ("answer", 0, 0), ("reply", 0)]
    assert asyncio.run(_play([True, True], ops)) == []
