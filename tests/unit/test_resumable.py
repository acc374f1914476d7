"""A bridged session's event log and the multiplexer's resumable streams, without a child."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from helpers.mux import Channel, request
from toolmesh.sidecar.transports.channel import Multiplexer
from toolmesh.sidecar.transports.resumable import GET_STREAM, RETRY_MS, EventLog, ResumeRefused


def test_every_stream_has_its_own_numbered_ids_and_a_priming_event_with_retry():
    log = EventLog()
    stream, priming = log.open_stream()
    assert stream != GET_STREAM and priming.data == b"" and priming.retry == RETRY_MS
    first = log.record(stream, b"a")
    other = log.record(GET_STREAM, b"b")
    assert priming.id.startswith(f"{stream}-") and first.id.startswith(f"{stream}-") and other.id.startswith("0-")
    assert len({priming.id, first.id, other.id}) == 3


def test_a_resume_gets_only_its_streams_later_events():
    log = EventLog()
    stream, priming = log.open_stream()
    other, _ = log.open_stream()
    one = log.record(stream, b"1")
    log.record(other, b"x")
    log.record(GET_STREAM, b"y")
    two = log.record(stream, b"2")
    assert log.after(priming.id) == (stream, [one, two])
    assert log.after(one.id) == (stream, [two])
    assert log.after(two.id) == (stream, [])


@pytest.mark.parametrize("last_event_id", ["", "garbage", "1", "1-", "-1", "x-1", "9-1", "1-99"])
def test_ids_never_issued_are_refused(last_event_id):
    log = EventLog()
    stream, _ = log.open_stream()
    log.record(stream, b"a")
    with pytest.raises(ResumeRefused, match="unknown"):
        log.after(last_event_id)


def test_the_log_keeps_at_most_its_event_count_and_an_id_whose_followers_went_is_expired():
    log = EventLog(max_events=3)
    stream, _ = log.open_stream()
    events = [log.record(stream, b"%d" % i) for i in range(5)]
    assert len(log) == 3
    with pytest.raises(ResumeRefused, match="expired"):
        log.after(events[0].id)
    assert log.after(events[1].id) == (stream, events[2:])


def test_the_log_keeps_at_most_its_bytes():
    log = EventLog(max_bytes=10_000)
    stream, _ = log.open_stream()
    events = [log.record(stream, b"x" * 3000) for _ in range(5)]
    assert log.size <= 10_000 and len(log) == 3
    with pytest.raises(ResumeRefused, match="expired"):
        log.after(events[0].id)
    assert log.after(events[1].id) == (stream, events[2:])


def test_another_streams_dropped_events_do_not_expire_a_quiet_stream():
    log = EventLog(max_events=2)
    quiet = log.record(GET_STREAM, b"kept")
    busy, _ = log.open_stream()
    for i in range(3):
        log.record(busy, b"%d" % i)  # pushes `quiet` itself out, but nothing of the GET stream after it
    assert log.after(quiet.id) == (GET_STREAM, [])


def test_the_marks_of_streams_that_lost_events_stay_bounded():
    log = EventLog(max_events=4)
    for _ in range(50):
        stream, _ = log.open_stream()
        log.record(stream, b"e")
    assert len(log._evicted) <= 4
    with pytest.raises(ResumeRefused, match="expired"):
        log.after("1-1")


async def _open_stream_call(mux: Multiplexer, channel: Channel, session, request_id="r"):
    call = asyncio.create_task(mux.post(request(request_id, name="x", _meta={"progressToken": "t"}), session))
    sent = await channel.next()
    token = sent["params"]["_meta"]["progressToken"]

    def progress(value: int) -> None:
        mux.receive(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                                  "params": {"progressToken": token, "progress": value}}))

    progress(1)
    return await call, sent, progress


async def test_a_resumed_stream_gets_the_missed_events_then_the_rest_and_the_call_is_not_cancelled():
    channel = Channel()
    mux = Multiplexer(channel.send, resume_grace=60)
    session = mux.new_session({})
    response, sent, progress = await _open_stream_call(mux, channel, session)
    events = response.events
    priming, first = await anext(events), await anext(events)
    assert priming.data == b"" and orjson.loads(first.data)["params"]["progress"] == 1
    progress(2)
    await response.release()  # the client went away
    assert channel.sent == [], "nothing is cancelled upstream while a resume may come"
    resumed = mux.resume(session, first.id)
    progress(3)
    mux.receive(orjson.dumps({"jsonrpc": "2.0", "id": sent["id"], "result": {"ok": True}}))
    rest = [orjson.loads(e.data) async for e in resumed.events]
    assert [m.get("params", {}).get("progress") for m in rest[:2]] == [2, 3]
    assert rest[2] == {"jsonrpc": "2.0", "id": "r", "result": {"ok": True}} and len(rest) == 3
    await resumed.release()
    assert channel.sent == [] and session.live == {}


async def test_a_call_nobody_resumes_is_cancelled_upstream_after_the_grace():
    channel = Channel()
    mux = Multiplexer(channel.send, resume_grace=0.01)
    session = mux.new_session({})
    response, sent, _ = await _open_stream_call(mux, channel, session)
    await response.release()
    cancelled = await channel.next()
    assert cancelled["method"] == "notifications/cancelled" and cancelled["params"]["requestId"] == sent["id"]
    assert session.pending == {} and session.live == {}


async def test_a_resume_takes_the_stream_over_from_a_reader_still_attached():
    channel = Channel()
    mux = Multiplexer(channel.send, resume_grace=60)
    session = mux.new_session({})
    response, sent, _ = await _open_stream_call(mux, channel, session)
    old = [e async for e in _until_data(response.events)]
    resumed = mux.resume(session, old[-1].id)
    assert [e async for e in response.events] == [], "the superseded stream ends"
    await response.release()
    mux.receive(orjson.dumps({"jsonrpc": "2.0", "id": sent["id"], "result": {}}))
    assert [orjson.loads(e.data)["id"] async for e in resumed.events] == ["r"]
    assert channel.sent == []


async def test_an_answer_arriving_with_the_first_event_is_logged_and_the_stream_ends_with_it():
    channel = Channel()
    mux = Multiplexer(channel.send)
    session = mux.new_session({})
    call = asyncio.create_task(mux.post(request("r", name="x", _meta={"progressToken": "t"}), session))
    sent = await channel.next()
    mux.receive(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                              "params": {"progressToken": sent["params"]["_meta"]["progressToken"], "progress": 1}}))
    mux.receive(orjson.dumps({"jsonrpc": "2.0", "id": sent["id"], "result": {}}))
    events = [e async for e in (await call).events]
    assert [bool(e.data) for e in events] == [False, True, True] and session.live == {}
    stream, replay = session.events.after(events[0].id)
    assert replay == events[1:]


async def _until_data(events):
    async for event in events:
        yield event
        if event.data:
            return
