"""A hostile second caller against a real sidecar: another's session, floods of batches, spoofed headers, huge integers.

Every test here attacks one guarantee of the README's security section through
real processes: the official SDK's server upstream (HTTP) or the SDK's stdio
server bridged by the sidecar, real JWTs checked against a real JWKS endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx2
import orjson
import pytest
import yaml

from helpers.mcp_servers import sdk_http_server
from helpers.sidecar import sidecar
from helpers.stdio_servers import STDIO_TOOLS
from helpers.tokens import JwksServer, TokenIssuer

SESSION_ERA = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
WIDE = 2**70 + 1
"""An integer beyond 64 bits whose nearest double is another integer (2**70): a float would change it."""


class RawSession:
    """A session-era MCP client speaking raw HTTP, so a test can replay its session id with other credentials."""

    def __init__(self, http: httpx2.AsyncClient, url: str, token: str | None):
        self.http, self.url, self.token = http, url, token
        self.session_id: str | None = None
        self._ids = iter(range(1, 1_000_000))

    def headers(self, token: str | None = None, session_id: str | None = None, **extra: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": ACCEPT, "MCP-Protocol-Version": SESSION_ERA, **extra}
        token = token if token is not None else self.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if session_id or self.session_id:
            headers["Mcp-Session-Id"] = session_id or self.session_id
        return headers

    async def open(self) -> RawSession:
        resp = await self.post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": SESSION_ERA, "capabilities": {"sampling": {}, "elicitation": {}},
            "clientInfo": {"name": "hostile-test", "version": "1"}}})
        assert resp.status_code == 200, resp.text
        self.session_id = resp.headers["Mcp-Session-Id"]
        resp = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert resp.status_code == 202, resp.text
        return self

    async def post(self, message: Any, *, token: str | None = None, session_id: str | None = None,
                   **extra: str) -> httpx2.Response:
        return await self.http.post(self.url, content=json.dumps(message).encode(),
                                    headers=self.headers(token, session_id, **extra))

    async def call(self, tool: str, arguments: dict[str, Any], **kw: Any) -> httpx2.Response:
        return await self.post({"jsonrpc": "2.0", "id": next(self._ids), "method": "tools/call",
                                "params": {"name": tool, "arguments": arguments}}, **kw)


def answer_of(resp: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC answer of a POST, whether it came as JSON or as the last SSE event."""
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1])  # the standard library keeps integers of any size exact
    return json.loads(resp.content)


@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer("https://login.test")


def guarded_policy(issuer: TokenIssuer, jwks_url: str, audit: str) -> dict[str, Any]:
    return {
        "auth": {"issuers": [{"issuer": issuer.issuer, "audiences": ["toolmesh"], "jwksUrl": jwks_url}]},
        "authorization": {"rules": [{"tools": ["echo", "add", "show_headers", "whoami", "slow"],
                                     "scopes": ["tools:read"]}]},
        "audit": {"sink": audit},
    }


@pytest.fixture(scope="module", params=["http", "stdio"])
def guarded(request, issuer, tmp_path_factory):
    """A sidecar with auth in front of the SDK's HTTP server, or bridging the SDK's stdio server."""
    tmp = tmp_path_factory.mktemp(f"hostile-{request.param}")
    audit = tmp / "audit.log"
    with JwksServer(issuer) as jwks:
        policy = tmp / "policy.yaml"
        policy.write_text(yaml.safe_dump(guarded_policy(issuer, jwks.url, str(audit))))
        if request.param == "http":
            with sdk_http_server(log_path=tmp / "server.log") as upstream:
                with sidecar(["--upstream", upstream], tmp, "--policy", str(policy), "--log-level", "DEBUG") as sc:
                    sc.audit_path = audit
                    sc.kind = "http"
                    yield sc
        else:
            with sidecar(["--upstream-command", " ".join(STDIO_TOOLS)], tmp, "--policy", str(policy),
                         "--log-level", "DEBUG") as sc:
                sc.audit_path = audit
                sc.kind = "stdio"
                yield sc


def echo_tool(sc) -> tuple[str, dict[str, Any]]:
    return "echo", {"text": "mine"}


async def test_another_callers_session_is_unknown_to_a_valid_token(guarded, issuer):
    """Bob holds a valid token and Alice's session id: every kind of request on it is answered 404."""
    alice, bob = issuer.token("alice", "tools:read"), issuer.token("bob", "tools:read")
    async with httpx2.AsyncClient(timeout=20) as http:
        session = await RawSession(http, guarded.url, alice).open()
        tool, arguments = echo_tool(guarded)
        mine = await session.call(tool, arguments)
        assert mine.status_code == 200 and "error" not in answer_of(mine), mine.text

        stolen = session.session_id
        attempts = {
            "tools/call": await session.call(tool, arguments, token=bob),
            "tools/list": await session.post({"jsonrpc": "2.0", "id": 7, "method": "tools/list"}, token=bob),
            "notification": await session.post({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                                "params": {"requestId": 1}}, token=bob),
            "response": await session.post({"jsonrpc": "2.0", "id": 0, "result": {}}, token=bob),
            "GET": await http.get(guarded.url, headers=session.headers(bob, stolen, Accept="text/event-stream")),
            "resume": await http.get(guarded.url, headers=session.headers(
                bob, stolen, Accept="text/event-stream", **{"Last-Event-ID": "1"})),
            "DELETE": await http.delete(guarded.url, headers=session.headers(bob, stolen)),
        }
        for what, resp in attempts.items():
            assert resp.status_code == 404, (what, resp.status_code, resp.text)

        # Anonymous callers are not even authenticated; a made-up session is as unknown as a stolen one.
        anonymous = await http.delete(guarded.url, headers={"Mcp-Session-Id": stolen})
        assert anonymous.status_code == 401
        made_up = await session.call(tool, arguments, session_id="0123456789abcdef0123456789abcdef")
        assert made_up.status_code == 404

        # Nothing Bob did touched Alice's session: it still works, and she alone may end it.
        again = await session.call(tool, arguments)
        assert again.status_code == 200 and "error" not in answer_of(again), again.text
        ended = await http.delete(guarded.url, headers=session.headers())
        assert ended.status_code in (200, 204), ended.text
        after = await session.call(tool, arguments)
        assert after.status_code == 404


async def test_a_refreshed_token_of_the_same_subject_keeps_its_session(guarded, issuer):
    async with httpx2.AsyncClient(timeout=20) as http:
        session = await RawSession(http, guarded.url, issuer.token("carol", "tools:read")).open()
        tool, arguments = echo_tool(guarded)
        resp = await session.call(tool, arguments, token=issuer.token("carol", "tools:read", ttl=600))
        assert resp.status_code == 200 and "error" not in answer_of(resp), resp.text
        other_issuer = TokenIssuer("https://elsewhere.test")
        assert (await session.call(tool, arguments, token=other_issuer.token("carol", "tools:read"))).status_code == 401


async def test_session_ids_never_reach_logs_or_audit_lines_in_clear(guarded, issuer):
    async with httpx2.AsyncClient(timeout=20) as http:
        session = await RawSession(http, guarded.url, issuer.token("dave", "tools:read")).open()
        await session.call("add", {"a": 1, "b": 2})
        await session.call("echo", {"text": "x"}, token=issuer.token("eve", "tools:read"))  # refused, audited
        await session.call("not-allowed", {})  # denied, audited
    audit = guarded.audit_path.read_text()
    assert "sessionRef" in audit
    assert session.session_id not in audit
    assert session.session_id not in guarded.log()


async def test_an_unauthenticated_batch_is_refused_once_without_stalling_others(guarded, issuer):
    """40,000 pings without a token: one 401, one audit line, and another caller's calls keep flowing."""
    flood = orjson.dumps([{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(40_000)])
    audit_before = guarded.audit_path.read_text().count("\n") if guarded.audit_path.exists() else 0
    token = issuer.token("frank", "tools:read")
    async with httpx2.AsyncClient(timeout=60) as http:
        session = await RawSession(http, guarded.url, token).open()

        async def attacker() -> httpx2.Response:
            return await http.post(guarded.url, content=flood, headers={"Content-Type": "application/json",
                                                                        "Accept": ACCEPT})

        stalls: list[float] = []

        async def victim(done: asyncio.Event) -> None:
            while not done.is_set():
                started = time.perf_counter()
                resp = await session.post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
                assert resp.status_code == 200, resp.text
                stalls.append(time.perf_counter() - started)

        done = asyncio.Event()
        victim_task = asyncio.create_task(victim(done))
        resp = await attacker()
        done.set()
        await victim_task
    assert resp.status_code in (400, 401), resp.text
    assert not resp.text.startswith("[")  # one answer for the batch, not 40,000
    audit_after = guarded.audit_path.read_text().count("\n")
    assert audit_after - audit_before <= 1
    assert stalls and max(stalls) < 5.0, max(stalls)


async def test_an_authenticated_batch_over_the_limit_is_refused_whole(guarded, issuer):
    token = issuer.token("gina", "tools:read")
    async with httpx2.AsyncClient(timeout=20) as http:
        session = await RawSession(http, guarded.url, token).open()
        too_many = [{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(101)]
        resp = await session.post(too_many)
        assert resp.status_code == 400
        assert "over the limit of 100" in resp.json()["error"]["message"]
        audit = guarded.audit_path.read_text()
        assert "gina" not in audit  # refused before any message ran


async def test_identity_headers_spelled_with_underscores_are_dropped(tmp_path, issuer):
    with JwksServer(issuer) as jwks, sdk_http_server(log_path=tmp_path / "up.log") as upstream:
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump(guarded_policy(issuer, jwks.url, str(tmp_path / "audit.log"))))
        with sidecar(["--upstream", upstream], tmp_path, "--policy", str(policy)) as sc:
            async with httpx2.AsyncClient(timeout=20) as http:
                session = await RawSession(http, sc.url, issuer.token("henry", "tools:read")).open()
                resp = await session.call("show_headers", {}, **{"X_Toolmesh_Subject": "root",
                                                                  "x_toolmesh_scopes": "mcp:admin"})
    seen = answer_of(resp)["result"]["structuredContent"]
    lowered = {k.lower().replace("_", "-"): v for k, v in seen.items()}
    assert lowered["x-toolmesh-subject"] == "henry"
    assert "mcp:admin" not in lowered["x-toolmesh-scopes"]
    assert not [k for k in seen if "_" in k and k.lower().replace("_", "-").startswith("x-toolmesh")]


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_integers_beyond_64_bits_reach_the_upstream_exactly_and_never_share_a_cache_entry(tmp_path, transport):
    """Traced (params re-serialised to carry the span) and cached with a shared scope: 2**70+1 stays 2**70+1,
    through an HTTP upstream and through the stdio bridge (which rewrites ids)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"cache": {"tools": [{"tools": ["add"], "shared": True, "readOnly": True}]}}))
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_BSP_SCHEDULE_DELAY": "60000"}
    with contextlib.ExitStack() as stack:
        if transport == "http":
            upstream = ["--upstream", stack.enter_context(sdk_http_server(log_path=tmp_path / "up.log"))]
        else:
            upstream = ["--upstream-command", " ".join(STDIO_TOOLS)]
        with sidecar(upstream, tmp_path, "--policy", str(policy), env=env) as sc:
            async with httpx2.AsyncClient(timeout=20) as http:
                session = await RawSession(http, sc.url, None).open()
                first = answer_of(await session.call("add", {"a": WIDE, "b": 0}))
                second = answer_of(await session.call("add", {"a": 2**70, "b": 0}))
                third = answer_of(await session.call("add", {"a": WIDE, "b": 0}))
    assert "result" in first, first
    assert first["result"]["structuredContent"]["result"] == WIDE, first
    assert second["result"]["structuredContent"]["result"] == 2**70, second
    assert third["result"]["structuredContent"]["result"] == WIDE, third


async def test_made_up_tool_names_never_become_metric_labels(tmp_path):
    with sdk_http_server(log_path=tmp_path / "up.log") as upstream:
        with sidecar(["--upstream", upstream], tmp_path) as sc:
            async with httpx2.AsyncClient(timeout=20) as http:
                session = await RawSession(http, sc.url, None).open()
                await session.post({"jsonrpc": "2.0", "id": 99, "method": "tools/list"})
                for i in range(300):
                    await session.call(f"made-up-{i}", {})
                await session.call("echo", {"text": "listed"})
                metrics = (await http.get(f"{sc.base}/metrics")).text
    assert "made-up-" not in metrics
    assert 'tool="_unlisted"' in metrics
    assert 'tool="echo"' in metrics


async def test_integers_beyond_64_bits_pass_the_gateway_exactly(tmp_path):
    """The gateway parses and rebuilds every call (the name is rewritten): a wide integer must survive that."""
    from helpers.registry_procs import beating, list_tools_of, registry_process

    with sidecar(["--upstream-command", " ".join(STDIO_TOOLS)], tmp_path) as sc, \
            registry_process(tmp_path, secret="s3cret") as registry:
        beat = {"server": "calc", "instance": "calc-0", "endpoint": sc.url, "tools": await list_tools_of(sc.url)}
        async with beating(registry, beat, secret="s3cret"), httpx2.AsyncClient(timeout=20) as http:
            session = await RawSession(http, f"{registry}/mcp", None).open()
            answer = answer_of(await session.call("calc__add", {"a": WIDE, "b": 1}))
    assert "result" in answer, answer
    assert answer["result"]["structuredContent"]["result"] == WIDE + 1, answer


async def test_a_stdio_server_never_inherits_the_heartbeat_secret(tmp_path):
    secret_file = tmp_path / "registry.secret"
    secret_file.write_text("file-secret")
    env = {"TOOLMESH_REGISTRY_SECRET": "env-secret", "TOOLMESH_REGISTRY_SECRET_FILE": str(secret_file),
           "TOOLMESH_TEST_MARKER": "inherited"}
    with sidecar(["--upstream-command", " ".join(STDIO_TOOLS)], tmp_path, env=env) as sc:
        async with httpx2.AsyncClient(timeout=20) as http:
            session = await RawSession(http, sc.url, None).open()
            seen = {name: answer_of(await session.call("environment", {"name": name}))["result"]["content"][0]["text"]
                    for name in env}
    assert seen["TOOLMESH_TEST_MARKER"] == "inherited"  # the rest of the environment still reaches the server
    assert seen["TOOLMESH_REGISTRY_SECRET"] == "" and seen["TOOLMESH_REGISTRY_SECRET_FILE"] == ""
