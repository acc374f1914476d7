"""One conversation, one context window: every server and replica it reaches charges the same ledger.

Through the real gateway (a gateway session sends one `Mcp-Budget-Key` to every sidecar), with real SDK clients:
two servers sharing `toolmesh up`'s kind of state file, and three replicas of one server on a real redis-server
behind the gateway's round robin, where a truncated result's pages are read from whichever replica answers.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import ResourceLink, TextContent

from helpers import async_wait_until
from helpers.mcp_servers import sdk_http_server
from helpers.redis_server import redis_server
from helpers.registry_procs import get_json, registry_process
from helpers.sidecar import guarded_sidecar, http_get
from helpers.tokens import TokenIssuer

pytestmark = pytest.mark.timeout(120)

META = "io.toolmesh/budget"
SECRET = "conversation-budget-heartbeats"


def words(count: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(count))


def text_of(result) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


def gateway_client(registry: str, token: str, **headers: str) -> Client:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}", **headers})
    return Client(streamable_http_client(f"{registry}/mcp", http_client=http), mode="legacy")


@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer("conversation-budget")


def budgeted(issuer: TokenIssuer, **budget) -> dict:
    return {"auth": issuer.hmac_auth(),
            "budget": {"totalTokens": 6000, "reservedForResponse": 500, "reservedForSystem": 500,
                       "minAvailable": 500, **budget}}


def sidecars(stack: ExitStack, tmp: Path, upstream: str, spec: dict, names: list[str], registry: str,
             *args: str) -> list:
    return [stack.enter_context(guarded_sidecar(["--upstream", upstream], tmp / f"{name}-{n}", spec,
                                                "--server-name", name, "--registry", registry, *args,
                                                env={"TOOLMESH_REGISTRY_SECRET": SECRET}, name=f"{name}-{n}"))
            for n, name in enumerate(names)]


async def healthy(registry: str, expected: dict[str, int]) -> None:
    async def ready() -> bool:
        servers = (await get_json(f"{registry}/v1/servers"))["servers"]
        seen = {s["name"]: sum(i["healthy"] for i in s["instances"]) for s in servers}
        return all(seen.get(name) == count for name, count in expected.items())

    await async_wait_until(ready, timeout=20, what=f"healthy instances {expected} at the registry")


async def test_a_conversation_that_spent_its_window_on_one_server_gets_no_fresh_one_from_another(issuer, tmp_path):
    spec = budgeted(issuer, resultFraction=1.0)
    with ExitStack() as stack:
        upstream = stack.enter_context(sdk_http_server(log_path=tmp_path / "server.log"))
        registry = stack.enter_context(registry_process(tmp_path, secret=SECRET))
        # As `toolmesh up` starts them: separate processes, one state file.
        sidecars(stack, tmp_path, upstream, spec, ["laba", "labb"], registry, "--state-file",
                 str(tmp_path / "state.db"))
        await healthy(registry, {"laba": 1, "labb": 1})
        alice = issuer.token("alice", alg="HS256")

        async with gateway_client(registry, alice) as conversation:
            big = await conversation.call_tool("labb__echo", {"text": words(1000)})
            spent = big.meta[META]["used"]
            assert spent == big.meta[META]["resultTokens"] > 1000 and big.meta[META]["truncated"] is False
            small = await conversation.call_tool("laba__echo", {"text": "hello"})
            # laba's answer reports the conversation's spending, labb's call included.
            assert small.meta[META]["used"] == spent + small.meta[META]["resultTokens"], small.meta
            spent = small.meta[META]["used"]
            for _ in range(5):
                answer = await conversation.call_tool("labb__echo", {"text": words(1000)})
                if answer.is_error:
                    break
                assert answer.meta[META]["used"] > spent
                spent = answer.meta[META]["used"]
            refused = await conversation.call_tool("laba__echo", {"text": "hello"})
            assert refused.is_error and text_of(refused).startswith("[BUDGET EXHAUSTED"), text_of(refused)
            assert refused.meta[META]["used"] == spent and refused.meta[META]["exhausted"] is True

        # Another conversation of the same subject, and a conversation of another subject, start afresh.
        for token in (alice, issuer.token("bob", alg="HS256")):
            async with gateway_client(registry, token) as fresh:
                answer = await fresh.call_tool("laba__echo", {"text": "hello"})
                assert answer.meta[META]["used"] == answer.meta[META]["resultTokens"], answer.meta


async def test_three_replicas_on_redis_charge_one_ledger_and_serve_each_others_pages(issuer, tmp_path):
    spec = budgeted(issuer, totalTokens=40000, resultFraction=0.3)
    with ExitStack() as stack:
        upstream = stack.enter_context(sdk_http_server(log_path=tmp_path / "server.log"))
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        registry = stack.enter_context(registry_process(tmp_path, secret=SECRET))
        replicas = sidecars(stack, tmp_path, upstream, spec, ["shared"] * 3, registry, "--state-redis-url", redis.url)
        await healthy(registry, {"shared": 3})
        alice = issuer.token("alice", alg="HS256")

        async with gateway_client(registry, alice) as conversation:
            spent = 0
            for n in range(6):  # round robin: each replica twice
                answer = await conversation.call_tool("shared__echo", {"text": f"call {n}"})
                assert answer.meta[META]["used"] == spent + answer.meta[META]["resultTokens"], (n, answer.meta)
                spent = answer.meta[META]["used"]
            served = [sum(float(line.rsplit(b" ", 1)[1]) for line in http_get(f"{r.base}/metrics")[1].splitlines()
                          if line.startswith(b"toolmesh_tool_result_bytes_count{")) for r in replicas]
            assert served == [2, 2, 2], f"each replica served two of the six calls: {served}"

            big = await conversation.call_tool("shared__echo", {"text": words(8000)})
            assert big.meta[META]["truncated"] is True
            link = next(str(c.uri) for c in big.content if isinstance(c, ResourceLink))
            spent = big.meta[META]["used"]
            # The pages, read through the gateway, come from whichever replica it picks: each has them all.
            uri, pages = link, []
            while uri and len(pages) < 20:
                contents = (await conversation.read_resource(uri)).contents
                pages.append(contents[0].text)
                uri = (contents[0].meta or {}).get("io.toolmesh/page", {}).get("next")
            assert "".join(pages) == words(8000)
            reads = [sum(float(line.rsplit(b" ", 1)[1]) for line in http_get(f"{r.base}/metrics")[1].splitlines()
                         if line.startswith(b'toolmesh_requests_total{method="resources/read"') and b'"ok"' in line)
                     for r in replicas]
            assert sum(reads) == len(pages) and sum(1 for n in reads if n) >= 2, f"pages read per replica: {reads}"
            for r in replicas:  # none fell back to its own memory
                assert b"\ntoolmesh_budget_store_errors_total " not in http_get(f"{r.base}/metrics")[1]

        # Another subject cannot read alice's pages, on any replica.
        async with gateway_client(registry, issuer.token("mallory", alg="HS256")) as intruder:
            with pytest.raises(MCPError, match="unknown resource|Resource not found"):
                await intruder.read_resource(link)


async def test_when_redis_is_down_the_budget_allows_by_default_or_refuses_and_recovers(issuer, tmp_path):
    from helpers.stateless_calls import post_tools_call

    with ExitStack() as stack:
        upstream = stack.enter_context(sdk_http_server(log_path=tmp_path / "server.log"))
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        allowing, denying = (stack.enter_context(guarded_sidecar(
            ["--upstream", upstream], tmp_path / decision, budgeted(issuer, onStoreError=decision),
            "--server-name", decision, "--state-redis-url", redis.url, name=decision)) for decision in ("allow", "deny"))
        carol = issuer.token("carol", alg="HS256")

        async def call(sidecar, n: int):
            return await post_tools_call(sidecar.url, "echo", {"text": "hello"}, token=carol, request_id=n,
                                         **{"Mcp-Budget-Key": "outage"})

        before = (await call(allowing, 1)).json()["result"]["_meta"][META]["used"]
        redis.kill()
        during = await call(allowing, 2)
        assert during.status_code == 200 and during.json()["result"]["_meta"][META]["used"] > 0
        refused = await call(denying, 3)
        assert refused.status_code == 503 and "budget's shared store did not answer" in refused.json()["error"]["message"]
        for sidecar in (allowing, denying):
            assert b"\ntoolmesh_budget_store_errors_total " in http_get(f"{sidecar.base}/metrics")[1]
            assert http_get(f"{sidecar.base}/readyz")[0] == 200  # the upstream answers: readiness holds
        assert "shared store did not answer" in allowing.log()

        redis.start()  # empty again, as a restarted Redis without persistence is
        again = await call(denying, 4)
        assert again.status_code == 200 and again.json()["result"]["_meta"][META]["used"] == before


async def test_two_gateways_three_replicas_one_redis_hold_one_rate_one_quota_one_window(issuer, tmp_path):
    """The scale picture on one machine: two registry replicas (a load balancer may send a stateless caller to
    either), three sidecar replicas of one server on one redis-server. Whatever path each call takes, a subject's
    rate, a quota and a conversation's window each hold exactly, and a page written on one replica is read
    through the other gateway."""
    from helpers.stateless_calls import STATELESS_ERA

    spec = {**budgeted(issuer, totalTokens=12000, resultFraction=0.5),
            "rateLimit": {"requestsPerSecond": 0.01, "burst": 3,
                          "tools": [{"tools": ["add", "echo"], "requestsPerSecond": 100, "burst": 100}]},
            "quota": {"rules": [{"name": "daily-adds", "calls": 5, "window": "day", "tools": ["add"]}]}}
    with ExitStack() as stack:
        upstream = stack.enter_context(sdk_http_server(log_path=tmp_path / "server.log"))
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        gateways = [stack.enter_context(registry_process(tmp_path, secret=SECRET)) for _ in range(2)]
        # Two replicas report to the first registry replica, one to the second.
        replicas = [*sidecars(stack, tmp_path, upstream, spec, ["shared"] * 2, gateways[0],
                              "--state-redis-url", redis.url),
                    *sidecars(stack, tmp_path / "b", upstream, spec, ["shared"], gateways[1],
                              "--state-redis-url", redis.url)]
        await healthy(gateways[0], {"shared": 2})
        await healthy(gateways[1], {"shared": 1})

        def stateless(gateway: str, token: str, **headers: str) -> Client:
            http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}", **headers})
            return Client(streamable_http_client(f"{gateway}/mcp", http_client=http), mode=STATELESS_ERA)

        async def alternating(token: str, tool: str, arguments: dict, calls: int, **headers: str) -> list:
            async with stateless(gateways[0], token, **headers) as a, stateless(gateways[1], token, **headers) as b:
                answers = []
                for n in range(calls):
                    try:
                        answers.append(await (a, b)[n % 2].call_tool(f"shared__{tool}", arguments))
                    except MCPError as exc:
                        answers.append(exc)
                return answers

        # A subject's rate: a burst of 3 in the default bucket (add and echo have their own), across both gateways.
        answers = await alternating(issuer.token("grace", alg="HS256"), "show_meta", {}, 6)
        assert [not isinstance(a, MCPError) for a in answers] == [True] * 3 + [False] * 3, answers
        assert all("rate limit" in str(a) for a in answers[3:]), answers[3:]
        # A quota: 5 adds a day for the subject, not 5 per replica or per gateway.
        answers = await alternating(issuer.token("heidi", alg="HS256"), "add", {"a": 1, "b": 2}, 7)
        assert [not isinstance(a, MCPError) for a in answers] == [True] * 5 + [False] * 2, answers
        assert all("daily-adds" in str(a) for a in answers[5:]), answers[5:]
        # A conversation's window: each answer reports everything spent before it, wherever it was spent.
        ivan = issuer.token("ivan", alg="HS256")
        answers = await alternating(ivan, "echo", {"text": words(700)}, 12, **{"Mcp-Budget-Key": "ivan-1"})
        spent, refused = 0, 0
        for answer in answers:
            figures = answer.meta[META]
            if figures.get("exhausted"):
                refused += 1
                assert figures["used"] == spent
                continue
            assert figures["used"] == spent + (figures["keptTokens"] if figures["truncated"] else figures["resultTokens"])
            spent = figures["used"]
        assert refused >= 2 and spent <= 12000 - 1000, (refused, spent)
        served = [sum(float(line.rsplit(b" ", 1)[1]) for line in http_get(f"{r.base}/metrics")[1].splitlines()
                      if line.startswith(b"toolmesh_tool_result_bytes_count{")) for r in replicas]
        assert all(served), f"every replica served calls: {served}"

        # A page written through one gateway is read through the other, by its subject only.
        async with stateless(gateways[0], ivan, **{"Mcp-Budget-Key": "ivan-2"}) as a, \
                stateless(gateways[1], ivan, **{"Mcp-Budget-Key": "ivan-2"}) as b:
            big = await a.call_tool("shared__echo", {"text": words(6000)})
            assert big.meta[META]["truncated"] is True
            link = next(str(c.uri) for c in big.content if isinstance(c, ResourceLink))
            page = (await b.read_resource(link)).contents[0]
            assert words(6000).startswith(page.text)
        async with stateless(gateways[1], issuer.token("mallory", alg="HS256")) as intruder:
            with pytest.raises(MCPError):
                await intruder.read_resource(link)


def _served(sidecar) -> float:
    lines = http_get(f"{sidecar.base}/metrics")[1].splitlines()
    return sum(float(line.rsplit(b" ", 1)[1]) for line in lines if line.startswith(b"toolmesh_tool_result_bytes_count{"))


async def test_calls_under_load_keep_flowing_while_redis_dies_and_comes_back(issuer, tmp_path):
    """Twenty callers at once, Redis killed and restarted under them: every call is answered (the budget's and
    the rate limit's onStoreError allow), none hangs or fails, and once Redis is back every charge lands again."""
    import asyncio

    from helpers.stateless_calls import post_tools_call

    spec = {**budgeted(issuer, totalTokens=10_000_000), "rateLimit": {"requestsPerSecond": 1e6, "burst": 1_000_000}}
    with ExitStack() as stack:
        upstream = stack.enter_context(sdk_http_server(log_path=tmp_path / "server.log"))
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        sidecar = stack.enter_context(guarded_sidecar(["--upstream", upstream], tmp_path / "s", spec,
                                                      "--state-redis-url", redis.url, name="loaded"))
        token = issuer.token("pat", alg="HS256")
        stop = asyncio.Event()

        async def caller(n: int) -> list[int]:
            statuses = []
            while not stop.is_set() and len(statuses) < 2000:
                answer = await post_tools_call(sidecar.url, "echo", {"text": "x"}, token=token, request_id=n,
                                               **{"Mcp-Budget-Key": f"load-{n}"})
                statuses.append(answer.status_code if "result" in answer.json() else -answer.status_code)
            return statuses

        def store_errors() -> float:
            lines = http_get(f"{sidecar.base}/metrics")[1].splitlines()
            return sum(float(line.split()[-1]) for line in lines if line.startswith(b"toolmesh_budget_store_errors_total "))

        async def reached(figure, target: float) -> bool:
            return figure() >= target

        callers = [asyncio.ensure_future(caller(n)) for n in range(20)]
        await async_wait_until(lambda: reached(lambda: _served(sidecar), 40), timeout=20, what="the callers under way")
        redis.kill()
        await async_wait_until(lambda: reached(store_errors, 20), timeout=20, what="calls answered while Redis is down")
        redis.start()
        served = _served(sidecar)
        await async_wait_until(lambda: reached(lambda: _served(sidecar), served + 40), timeout=20,
                               what="calls after the restart")
        stop.set()
        answered = [status for statuses in await asyncio.gather(*callers) for status in statuses]
        assert answered and set(answered) == {200}, sorted(set(answered))
        assert b"\ntoolmesh_budget_store_errors_total " in http_get(f"{sidecar.base}/metrics")[1]
        # Back: a new conversation's charges land in Redis again, each call seeing the one before.
        first = (await post_tools_call(sidecar.url, "echo", {"text": "x"}, token=token,
                                       **{"Mcp-Budget-Key": "after"})).json()["result"]["_meta"][META]
        second = (await post_tools_call(sidecar.url, "echo", {"text": "x"}, token=token,
                                        **{"Mcp-Budget-Key": "after"})).json()["result"]["_meta"][META]
        assert second["used"] == first["used"] + second["resultTokens"]
