"""Retries, circuit breakers, timeouts and progress through the real sidecar, against a fault-injecting upstream."""

from __future__ import annotations

import asyncio
import time

import pytest
import yaml
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import ElicitResult, TextContent

from helpers import ROOT, async_wait_until
from helpers.fault_upstream import Fault
from helpers.stateless_calls import STATELESS_ERA
from helpers.sidecar import http_get, sidecar

CIRCUIT_OPEN = -32006
UPSTREAM_TIMEOUT = -32002


@pytest.fixture(scope="module")
def proxied(relay, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resilience")
    # The retry/breaker and timeout examples together, with times short enough for a test.
    policy = yaml.safe_load((ROOT / "examples/policies/retry-circuit-breaker.yaml").read_text())
    spec = policy["spec"]
    spec["retry"].update(baseDelayMs=50, maxDelayMs=1500, jitter="none")
    spec["circuitBreaker"].update(failureThreshold=3, openSeconds=1)
    spec["timeouts"] = yaml.safe_load((ROOT / "examples/policies/timeouts.yaml").read_text())["spec"]["timeouts"]
    spec["timeouts"].update(callSeconds=1, progressExtensionSeconds=1, maxSeconds=2.5)
    path = tmp / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    with sidecar(["--upstream", relay.url], tmp, "--policy", str(path)) as sc:
        yield sc


def text_of(result) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


def metric(base: str, line_start: str) -> str | None:
    _, body = http_get(f"{base}/metrics")
    for line in body.decode().splitlines():
        if line.startswith(line_start):
            return line.rsplit(" ", 1)[1]
    return None


@pytest.fixture(autouse=True)
def healed(relay):
    yield
    relay.heal()


@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA])
@pytest.mark.parametrize("fault", [Fault("status", status=503), Fault("status", status=502), Fault("drop"),
                                   Fault("garbage")], ids=["503", "502", "drop", "garbage"])
async def test_transient_failures_of_a_safe_tool_are_retried(proxied, relay, mode, fault):
    async with Client(proxied.url, mode=mode) as client:
        await client.list_tools()
        relay.inject("flaky", fault, fault)
        before = relay.count("flaky")
        result = await client.call_tool("flaky", {"q": "again"})
        assert text_of(result) == "flaky ok again"
        assert relay.count("flaky") == before + 3


async def test_unsafe_tools_are_not_retried_and_the_failure_reaches_the_client(proxied, relay):
    async with Client(proxied.url, mode="legacy") as client:
        await client.list_tools()
        relay.inject("send", Fault("status", status=503))
        before = relay.count("send")
        with pytest.raises(Exception):
            await client.call_tool("send", {"q": "once"})
        assert relay.count("send") == before + 1
        relay.inject("send", Fault("drop"))
        with pytest.raises(MCPError):
            await client.call_tool("send", {"q": "once"})
        assert relay.count("send") == before + 2


async def test_retry_after_is_honoured_and_waits_are_reported_as_progress(proxied, relay):
    seen: list[str | None] = []

    async def on_progress(progress, total, message):
        seen.append(message)

    async with Client(proxied.url, mode="legacy") as client:
        await client.list_tools()
        relay.inject("flaky", Fault("status", status=503, retry_after="1"))
        began = time.monotonic()
        result = await client.call_tool("flaky", {"q": "patient"}, progress_callback=on_progress)
        assert text_of(result) == "flaky ok patient"
        assert time.monotonic() - began >= 1.0
    assert seen and "retry 1 of 2 in 1.0s" in seen[0]


async def test_breaker_opens_answers_at_once_then_half_opens_and_closes(proxied, relay):
    async with Client(proxied.url, mode="legacy") as client:
        await client.list_tools()
        relay.inject("lookup", Fault("status", status=503), sticky=True)
        before = relay.count("lookup")
        with pytest.raises(Exception):
            await client.call_tool("lookup", {"q": "down"})  # 3 attempts, 3 failures: open
        assert relay.count("lookup") == before + 3
        assert metric(proxied.base, 'toolmesh_circuit_breaker_state{tool="lookup"}') == "1"

        with pytest.raises(MCPError) as refused:
            await client.call_tool("lookup", {"q": "down"})
        assert refused.value.error.code == CIRCUIT_OPEN
        assert "circuit breaker open" in refused.value.error.message
        assert relay.count("lookup") == before + 3  # answered without reaching the upstream

        # After openSeconds one trial goes through; it fails, so the breaker opens again.
        async def trial_made():
            try:
                await client.call_tool("lookup", {"q": "down"})
            except MCPError as exc:
                if exc.error.code == CIRCUIT_OPEN:
                    return relay.count("lookup") > before + 3
                raise
            except Exception:  # noqa: BLE001 - the trial's own 503
                return True
            return False

        await async_wait_until(trial_made, timeout=10, interval=0.1, what="a half-open trial")
        assert relay.count("lookup") == before + 4
        assert metric(proxied.base, 'toolmesh_circuit_breaker_state{tool="lookup"}') == "1"

        relay.heal("lookup")

        async def closed():
            try:
                return text_of(await client.call_tool("lookup", {"q": "up"})) == "result for up"
            except MCPError as exc:
                if exc.error.code == CIRCUIT_OPEN:
                    return False
                raise

        await async_wait_until(closed, timeout=10, interval=0.1, what="the breaker to close")
        assert metric(proxied.base, 'toolmesh_circuit_breaker_state{tool="lookup"}') == "0"
        assert metric(proxied.base, 'toolmesh_circuit_breaker_opened_total{tool="lookup"}') == "2"


@pytest.mark.parametrize("mode", ["legacy", STATELESS_ERA])
async def test_progress_extends_the_timeout(proxied, mode):
    seen: list[float] = []

    async def on_progress(progress, total, message):
        seen.append(progress)

    async with Client(proxied.url, mode=mode) as client:
        # 4 × 0.5 s = 2 s in all, twice callSeconds, but never 1 s without progress.
        result = await client.call_tool("work", {"steps": 4, "delay": 0.5}, progress_callback=on_progress)
    assert text_of(result) == "worked 4"
    assert seen == [1.0, 2.0, 3.0, 4.0]


async def test_silence_times_out_with_504_and_the_upstream_is_told(proxied, relay):
    async with Client(proxied.url, mode="legacy") as client:
        began = time.monotonic()
        with pytest.raises(MCPError) as timed_out:
            await client.call_tool("stall", {"seconds": 8})
        assert time.monotonic() - began < 5
        assert timed_out.value.error.code == UPSTREAM_TIMEOUT
        await async_wait_until(_async(lambda: relay.cancelled), timeout=5, what="notifications/cancelled upstream")


async def test_progress_never_extends_past_the_hard_maximum(proxied):
    seen: list[float] = []

    async def on_progress(progress, total, message):
        seen.append(progress)

    async with Client(proxied.url, mode="legacy") as client:
        began = time.monotonic()
        with pytest.raises(MCPError) as timed_out:
            await client.call_tool("work", {"steps": 20, "delay": 0.4}, progress_callback=on_progress)
        elapsed = time.monotonic() - began
        assert timed_out.value.error.code == UPSTREAM_TIMEOUT
        assert 2.4 <= elapsed < 6
        assert len(seen) >= 4  # progress kept coming; only the hard maximum ended the call


async def test_waiting_for_the_user_is_not_upstream_silence(proxied):
    async def slow_person(ctx, params):
        await asyncio.sleep(1.5)  # longer than callSeconds: a person thinking, not a silent upstream
        return ElicitResult(action="accept", content={"colour": "teal"})

    async with Client(proxied.url, mode="legacy", elicitation_callback=slow_person) as client:
        assert text_of(await client.call_tool("ask", {})) == "colour=teal"


def _async(predicate):
    async def check():
        return predicate()

    return check
