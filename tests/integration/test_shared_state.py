"""Rate limits and quotas hold across sidecar replicas that share a real redis-server, and a store outage is decided."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest

from helpers import wait_until
from helpers.mcp_servers import sdk_http_server
from helpers.redis_server import redis_server
from helpers.sidecar import guarded_sidecar, http_get
from helpers.stateless_calls import post_tools_call
from helpers.tokens import TokenIssuer

pytestmark = pytest.mark.timeout(120)


def policy(issuer: TokenIssuer, on_store_error: str = "allow") -> dict:
    # Slow refill, so a loaded machine cannot earn a token back between calls.
    return {"auth": issuer.hmac_auth(),
            "rateLimit": {"requestsPerSecond": 0.01, "burst": 3, "onStoreError": on_store_error}}


def replicas(stack: ExitStack, tmp: Path, upstream: str, spec: dict, count: int, *args: str) -> list:
    return [stack.enter_context(guarded_sidecar(["--upstream", upstream], tmp / f"r{n}", spec,
                                                "--server-name", "shared", *args, name=f"replica{n}"))
            for n in range(count)]


async def statuses(urls: list[str], token: str, calls: int) -> list[int]:
    """`calls` tools/calls, round robin over the replicas, as a gateway spreads them."""
    return [(await post_tools_call(urls[n % len(urls)], "echo", {"text": "x"}, token=token, request_id=n)).status_code
            for n in range(calls)]


@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer("shared-rate-issuer")


async def test_three_replicas_on_one_redis_grant_a_subject_its_burst_once_not_three_times(issuer, tmp_path):
    with ExitStack() as stack:
        upstream = stack.enter_context(sdk_http_server(log_path=tmp_path / "server.log"))
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        shared = replicas(stack, tmp_path, upstream, policy(issuer), 3, "--state-redis-url", redis.url)
        alice, bob = issuer.token("alice", alg="HS256"), issuer.token("bob", alg="HS256")
        assert await statuses([r.url for r in shared], alice, 6) == [200, 200, 200, 429, 429, 429]
        # Another subject has its own bucket, on every replica.
        assert await statuses([r.url for r in shared[1:]], bob, 3) == [200, 200, 200]

        # The same replicas without the shared store: each keeps its own buckets, so the burst multiplies.
        apart = replicas(stack, tmp_path / "apart", upstream, policy(issuer), 3)
        assert await statuses([r.url for r in apart], alice, 9) == [200] * 9


async def test_when_redis_is_down_allow_lets_calls_through_and_deny_refuses_them_and_both_recover(issuer, tmp_path):
    with ExitStack() as stack:
        upstream = stack.enter_context(sdk_http_server(log_path=tmp_path / "server.log"))
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        (allowing,) = replicas(stack, tmp_path / "allow", upstream, policy(issuer, "allow"), 1,
                               "--state-redis-url", redis.url)
        (denying,) = replicas(stack, tmp_path / "deny", upstream, policy(issuer, "deny"), 1,
                              "--state-redis-url", redis.url)
        carol, dave = issuer.token("carol", alg="HS256"), issuer.token("dave", alg="HS256")
        assert await statuses([allowing.url], carol, 1) == [200]
        assert await statuses([denying.url], dave, 1) == [200]

        redis.kill()
        assert await statuses([allowing.url], carol, 4) == [200] * 4  # uncharged: the limit cannot be read
        refused = await post_tools_call(denying.url, "echo", {"text": "x"}, token=dave, request_id=1)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert "onStoreError is deny" in refused.json()["error"]["message"]
        for replica in (allowing, denying):
            _, metrics = http_get(f"{replica.base}/metrics")
            assert b"toolmesh_rate_limit_store_errors_total" in metrics
            assert http_get(f"{replica.base}/readyz")[0] == 200  # the upstream answers: readiness holds
        assert "shared store did not answer" in allowing.log()

        redis.start()  # empty again, as a restarted Redis without persistence is
        wait_until(lambda: http_get(f"{denying.base}/readyz")[0] == 200, what="the denying replica ready")
        assert await statuses([denying.url], dave, 4) == [200, 200, 200, 429]


def test_a_store_url_of_another_scheme_is_refused_at_start():
    import argparse

    from toolmesh.api.errors import UsageError
    from toolmesh.sidecar.command import make_store

    with pytest.raises(UsageError, match="redis://, rediss:// or unix://"):
        make_store(argparse.Namespace(state_redis_url="http://127.0.0.1:6379", server_name="s"))
    assert make_store(argparse.Namespace(state_redis_url=None, server_name="s")) is None


def quotas(issuer: TokenIssuer, **section) -> dict:
    return {"auth": issuer.hmac_auth(), "budget": {"totalTokens": 1_000_000},
            "quota": {"rules": [{"name": "daily-calls", "calls": 4, "window": "day"},
                                {"name": "echo-tokens", "resultTokens": 2, "window": "hour", "tools": ["add"]}],
                      **section}}


async def test_quotas_hold_across_replicas_name_themselves_and_deny_by_default_when_redis_is_down(issuer, tmp_path):
    with ExitStack() as stack:
        upstream = stack.enter_context(sdk_http_server(log_path=tmp_path / "server.log"))
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        shared = replicas(stack, tmp_path, upstream, quotas(issuer), 2, "--state-redis-url", redis.url)
        erin, frank = issuer.token("erin", alg="HS256"), issuer.token("frank", alg="HS256")
        assert await statuses([r.url for r in shared], erin, 5) == [200, 200, 200, 200, 429]
        refused = await post_tools_call(shared[1].url, "echo", {"text": "x"}, token=erin, request_id=9)
        assert refused.status_code == 429 and 0 < int(refused.headers["Retry-After"]) <= 86_400
        error = refused.json()["error"]
        assert error["data"]["quota"] == "daily-calls" and "4 calls per day" in error["message"]

        # A token quota: the call that crosses it completes (add's result is one token or more), the next is refused.
        first = await post_tools_call(shared[0].url, "add", {"a": 1, "b": 2}, token=frank, request_id=1)
        second = await post_tools_call(shared[1].url, "add", {"a": 1, "b": 2}, token=frank, request_id=2)
        third = await post_tools_call(shared[0].url, "add", {"a": 1, "b": 2}, token=frank, request_id=3)
        assert (first.status_code, third.status_code) == (200, 429), (first.text, second.text, third.text)
        assert third.json()["error"]["data"]["quota"] == "echo-tokens"

        redis.kill()
        down = await post_tools_call(shared[0].url, "echo", {"text": "x"}, token=frank, request_id=4)
        assert down.status_code == 503 and "quotas' shared store did not answer" in down.json()["error"]["message"]
        _, metrics = http_get(f"{shared[0].base}/metrics")
        assert b"toolmesh_quota_store_errors_total 1" in metrics
        assert b'toolmesh_quota_exceeded_total{quota="daily-calls"}' in http_get(f"{shared[1].base}/metrics")[1]
