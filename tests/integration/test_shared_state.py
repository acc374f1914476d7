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


def replicas(stack: ExitStack, tmp: Path, upstream: str, spec: dict, count: int, *args: str,
             env: dict[str, str] | None = None) -> list:
    return [stack.enter_context(guarded_sidecar(["--upstream", upstream], tmp / f"r{n}", spec,
                                                "--server-name", "shared", *args, env=env, name=f"replica{n}"))
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
    from toolmesh.sidecar.command import make_stores

    with pytest.raises(UsageError, match="redis://, rediss:// or unix://"):
        make_stores(argparse.Namespace(state_redis_url="http://127.0.0.1:6379", state_file=None, server_name="s"))
    assert make_stores(argparse.Namespace(state_redis_url=None, state_file=None, server_name="s")) == (None, None)


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


async def test_through_the_gateways_round_robin_three_replicas_hold_one_rate_and_one_quota(issuer, tmp_path):
    from helpers import async_wait_until
    from helpers.registry_procs import get_json, registry_process

    secret = "shared-state-heartbeats"
    # echo: a burst of 3 per subject; add: its own roomy bucket, and a quota of 5 calls a day.
    spec = {"auth": issuer.hmac_auth(),
            "rateLimit": {"requestsPerSecond": 0.01, "burst": 3,
                          "tools": [{"tools": ["add"], "requestsPerSecond": 100, "burst": 100}]},
            "quota": {"rules": [{"name": "daily-adds", "calls": 5, "window": "day", "tools": ["add"]}]}}
    with ExitStack() as stack:
        upstream = stack.enter_context(sdk_http_server(log_path=tmp_path / "server.log"))
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        registry = stack.enter_context(registry_process(tmp_path, secret=secret))
        shared = replicas(stack, tmp_path, upstream, spec, 3, "--state-redis-url", redis.url, "--registry", registry,
                          env={"TOOLMESH_REGISTRY_SECRET": secret})

        async def three_instances() -> bool:
            servers = (await get_json(f"{registry}/v1/servers"))["servers"]
            # Healthy, all three: the round robin passes over an instance whose first heartbeat said "starting".
            return [sum(i["healthy"] for i in s["instances"]) for s in servers if s["name"] == "shared"] == [3]

        await async_wait_until(three_instances, timeout=20, what="three healthy instances of shared at the registry")
        gateway = f"{registry}/mcp"

        async def outcomes(token: str, tool: str, arguments: dict, calls: int) -> list[str]:
            answers = []
            for n in range(calls):
                body = (await post_tools_call(gateway, f"shared__{tool}", arguments, token=token, request_id=n)).json()
                answers.append("ok" if "result" in body else f'{body["error"]["code"]} {body["error"]["message"]}')
            return answers

        # The rate: a burst of 3 for the subject, whichever replica the gateway picks.
        grace = issuer.token("grace", alg="HS256")
        answers = await outcomes(grace, "echo", {"text": "x"}, 6)
        assert answers[:3] == ["ok"] * 3 and all(a.startswith("-32005 rate limit") for a in answers[3:]), answers
        served = [sum(float(line.rsplit(b" ", 1)[1]) for line in http_get(f"{r.base}/metrics")[1].splitlines()
                      if line.startswith(b"toolmesh_tool_result_bytes_count{")) for r in shared]
        assert served == [1, 1, 1], f"the gateway's round robin gives each replica one of the three calls: {served}"
        # The quota: 5 calls of add a day for the subject, not 5 per replica.
        heidi = issuer.token("heidi", alg="HS256")
        answers = await outcomes(heidi, "add", {"a": 1, "b": 2}, 7)
        assert answers[:5] == ["ok"] * 5 and all("quota 'daily-adds' used up" in a for a in answers[5:]), answers


async def test_over_tls_with_a_password_replicas_share_and_a_wrong_password_is_refused_without_leaking(issuer,
                                                                                                     tmp_path):
    from helpers.redis_server import tls_redis_server

    password = "store-password-from-a-secret"
    with ExitStack() as stack:
        upstream = stack.enter_context(sdk_http_server(log_path=tmp_path / "server.log"))
        url = stack.enter_context(tls_redis_server(tmp_path / "redis", password))
        shared = replicas(stack, tmp_path, upstream, policy(issuer), 2, "--state-redis-url", url,
                          env={"TOOLMESH_STATE_REDIS_PASSWORD": password})
        assert await statuses([r.url for r in shared], issuer.token("olga", alg="HS256"), 5) == [200] * 3 + [429] * 2
        (wrong,) = replicas(stack, tmp_path / "wrong", upstream, policy(issuer, "deny"), 1, "--state-redis-url", url,
                            env={"TOOLMESH_STATE_REDIS_PASSWORD": "not-the-password"})
        refused = await post_tools_call(wrong.url, "echo", {"text": "x"}, token=issuer.token("olga", alg="HS256"))
        assert refused.status_code == 503, refused.text
        assert "shared store did not answer" in wrong.log()
        for sidecar in (*shared, wrong):  # the password is in no log and no metric
            assert password not in sidecar.log() and "not-the-password" not in sidecar.log()
            assert password.encode() not in http_get(f"{sidecar.base}/metrics")[1]
