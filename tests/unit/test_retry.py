"""The retry stage as a pure object: what is retried, how long it waits, and what the client hears meanwhile."""

from __future__ import annotations

import orjson
import pytest

from toolmesh.api.policy import Jitter, MCPToolPolicySpec, RetryStrategy
from toolmesh.sidecar.chain.frame import CallContext, Outcome, SseEvent
from toolmesh.sidecar.errors import Refused, UpstreamTimeout, UpstreamUnavailable
from toolmesh.sidecar.chain.stages import retry
from toolmesh.sidecar.chain.stages.retry import RetrySchedule
from toolmesh.sidecar.chain.state import SharedState

TOOLS = [
    {"name": "lookup", "annotations": {"readOnlyHint": True}},
    {"name": "put", "annotations": {"idempotentHint": True, "readOnlyHint": False}},
    {"name": "send"},
]


def make_stage(section: dict | None = None, tools: list | None = None):
    spec = {"retry": {"baseDelayMs": 100, "maxDelayMs": 1000, "jitter": "none", **(section or {})}}
    if tools:
        spec["tools"] = tools
    policy = MCPToolPolicySpec.model_validate(spec)
    shared = SharedState(server_name="srv")
    shared.tools.update(TOOLS)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    stage = retry.RetryStage(policy.retry, shared.tools, spec=policy, sleep=sleep, rand=lambda: 0.25)
    assert retry.build(policy, shared) is not None
    return stage, waits


def call(tool="lookup", progress_token=None, events=None):
    params = {"name": tool, "arguments": {}}
    if progress_token is not None:
        params["_meta"] = {"progressToken": progress_token}

    async def emit(event: SseEvent) -> None:
        events.append(orjson.loads(event.data))

    kwargs = {"emit": emit} if events is not None else {}
    return CallContext(method="tools/call", request_id=7, params=params, raw=b"", headers={}, **kwargs)


def ok(ctx):
    return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": {"content": []}})


class Script:
    """Answers each attempt with the next scripted failure, then success."""

    def __init__(self, *failures):
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self, ctx):
        self.calls += 1
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        return ok(ctx)


def status(code, **headers):
    return Outcome(raw=b"Service Unavailable", status=code, headers=headers)


INTERNAL = Outcome(raw=b'{"jsonrpc":"2.0","id":7,"error":{"code":-32603,"message":"boom"}}')


@pytest.mark.parametrize("failure", [UpstreamUnavailable("down"), UpstreamTimeout("slow"), status(502), status(503),
                                     status(504), INTERNAL])
async def test_transient_failures_are_retried(failure):
    stage, waits = make_stage()
    upstream = Script(failure, failure)
    outcome = await stage(call(), upstream)
    assert upstream.calls == 3 and outcome.status == 200
    assert waits == [0.1, 0.2]


@pytest.mark.parametrize("failure", [Refused("bad"), status(400), status(500),
                                     Outcome(raw=b'{"jsonrpc":"2.0","id":7,"error":{"code":-32602,"message":"x"}}'),
                                     Outcome(raw=b'{"jsonrpc":"2.0","id":7,"result":{"isError":true,"content":[]}}')])
async def test_other_failures_are_not_retried(failure):
    stage, _ = make_stage()
    upstream = Script(failure)
    if isinstance(failure, Exception):
        with pytest.raises(Refused):
            await stage(call(), upstream)
    else:
        assert await stage(call(), upstream) is failure
    assert upstream.calls == 1


async def test_gives_up_after_max_attempts_with_the_last_failure():
    stage, waits = make_stage({"maxAttempts": 3})
    upstream = Script(status(503), status(503), status(503), status(503))
    outcome = await stage(call(), upstream)
    assert outcome.status == 503 and upstream.calls == 3 and len(waits) == 2
    upstream = Script(UpstreamUnavailable("a"), UpstreamUnavailable("b"), UpstreamUnavailable("c"))
    with pytest.raises(UpstreamUnavailable, match="c"):
        await stage(call(), upstream)


async def test_only_idempotent_or_read_only_tools_unless_forced():
    stage, _ = make_stage()
    for tool, expected in (("lookup", 2), ("put", 2), ("send", 1), ("unknown", 1)):
        upstream = Script(status(503))
        await stage(call(tool), upstream)
        assert upstream.calls == expected, tool
    stage, _ = make_stage(tools=None, section={"tools": [{"tools": ["send"], "force": True}]})
    upstream = Script(status(503))
    await stage(call("send"), upstream)
    assert upstream.calls == 2
    # The policy's `tools` overrides can also make a tool idempotent.
    stage, _ = make_stage(tools=[{"tools": ["send"], "idempotent": True}])
    upstream = Script(status(503))
    await stage(call("send"), upstream)
    assert upstream.calls == 2


async def test_retry_after_is_honoured_and_too_long_a_wait_is_not_made():
    stage, waits = make_stage()
    upstream = Script(status(503, **{"Retry-After": "0.7"}))
    await stage(call(), upstream)
    assert waits == [0.7]
    stage, waits = make_stage()
    upstream = Script(status(503, **{"Retry-After": "120"}))
    outcome = await stage(call(), upstream)
    assert outcome.status == 503 and upstream.calls == 1 and waits == []


def test_delay_strategies_and_jitter():
    def schedule(strategy, jitter):
        return RetrySchedule(max_attempts=10, strategy=strategy, base_delay=1.0, max_delay=30.0, jitter=jitter)

    exp = schedule(RetryStrategy.exponential, Jitter.none)
    assert [exp.delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    lin = schedule(RetryStrategy.linear, Jitter.none)
    assert [lin.delay(n) for n in range(3)] == [1, 2, 3]
    assert schedule(RetryStrategy.immediate, Jitter.equal).delay(5) == 0
    equal = schedule(RetryStrategy.exponential, Jitter.equal)
    assert equal.delay(1, lambda: 0.0) == 1.0 and equal.delay(1, lambda: 0.999) == pytest.approx(2.998)
    full = schedule(RetryStrategy.exponential, Jitter.full)
    assert full.delay(2, lambda: 0.5) == 2.0 and full.delay(2, lambda: 0.0) == 0.0
    # Jitter never pushes a delay past the maximum.
    assert equal.delay(9, lambda: 0.999) == 30.0


async def test_per_tool_rules_override_the_section():
    stage, waits = make_stage({"tools": [{"tools": ["look*"], "maxAttempts": 5, "strategy": "linear"}]})
    upstream = Script(*[status(503)] * 4)
    await stage(call(), upstream)
    assert upstream.calls == 5 and waits == pytest.approx([0.1, 0.2, 0.3, 0.4])


async def test_waits_are_reported_as_progress_when_asked():
    stage, _ = make_stage()
    events: list = []
    await stage(call(progress_token="tok", events=events), Script(status(503), status(503)))
    assert [e["method"] for e in events] == ["notifications/progress"] * 2
    assert events[0]["params"]["progressToken"] == "tok"
    assert "retry 1 of 2" in events[0]["params"]["message"]
    silent: list = []
    await stage(call(events=silent), Script(status(503)))
    assert silent == []


async def test_an_unreadable_answer_is_a_transport_failure():
    stage, _ = make_stage()
    garbage = Outcome(raw=b"\x00not json{", status=200)
    upstream = Script(garbage)
    outcome = await stage(call(), upstream)
    assert upstream.calls == 2 and outcome.status == 200
    with pytest.raises(UpstreamUnavailable, match="not JSON-RPC"):
        await stage(call(), Script(garbage, garbage, garbage))
