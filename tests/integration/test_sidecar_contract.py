"""The sidecar as agents meet it, through real processes: steady readiness against uvicorn's keep-alive, typed
results inside the budget, stateless budgets that do not lock a subject out, rate limits that count calls, and
one log line per call with its trace."""

from __future__ import annotations

import asyncio
import json
import re
import select
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
import orjson
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import ResourceLink, TextContent

from helpers import free_port, toolmesh_cli, wait_until
from helpers.mcp_servers import sdk_http_server
from helpers.stateless_calls import post_tools_call
from helpers.sidecar import http_get, sidecar
from helpers.tokens import TokenIssuer

from toolmesh.sidecar.transports.http import HttpUpstream

BUDGET = "io.toolmesh/budget"


def metric(base: str, name: str, labels: str = "") -> float:
    _, body = http_get(f"{base}/metrics")
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", body.decode(), re.M)
    return float(match.group(1)) if match else 0.0


def log_events(text: str, event: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event:
                lines.append(entry)
    return lines


# -- 2. readiness against uvicorn's keep-alive ------------------------------------------------------------------


class KeepAliveRace:
    """A TCP relay in front of a server whose keep-alive timer fires just as a request arrives on an idle connection.

    uvicorn closes a connection idle for its keep-alive timeout; a request written in the same instant is
    never answered. The relay makes that instant certain: a request that arrives on a connection idle for
    `idle` seconds or more is dropped together with the connection, unanswered.
    """

    def __init__(self, upstream_port: int, idle: float):
        self.upstream_port = upstream_port
        self.idle = idle
        self.port = free_port()
        self.dropped = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        last = [time.monotonic()]

        async def answers() -> None:
            # The server's own close is not passed on: the client learns of it only when its request goes unanswered.
            while chunk := await up_reader.read(65536):
                last[0] = time.monotonic()
                writer.write(chunk)

        back = asyncio.ensure_future(answers())
        try:
            while chunk := await reader.read(65536):
                if time.monotonic() - last[0] >= self.idle:
                    self.dropped += 1
                    break
                last[0] = time.monotonic()
                up_writer.write(chunk)
        except ConnectionError:
            pass
        finally:
            back.cancel()
            up_writer.close()
            writer.close()

    @contextmanager
    def running(self) -> Iterator[str]:
        self._thread.start()
        self._ready.wait(5)
        try:
            yield f"http://127.0.0.1:{self.port}/mcp"
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


def test_readiness_does_not_flap_when_the_server_closes_idle_connections(tmp_path):
    # uvicorn's keep-alive made 1 s and the probe interval just above it: every probe that reused the
    # previous probe's connection met the server's close, and the sidecar went not ready for a moment.
    port = free_port()
    with sdk_http_server(keep_alive=1, port=port, log_path=tmp_path / "server.log"):
        race = KeepAliveRace(port, idle=1.0)
        with race.running() as url, sidecar(["--upstream", url], tmp_path, "--probe-interval", "1.05") as sc:
            def settled():
                return ([e for e in log_events(sc.log(), "readiness") if e["ready"] is False]
                        or metric(sc.base, "toolmesh_upstream_probes_total", '{result="ok"}') >= 5)
            wait_until(settled, timeout=30, interval=0.1, what="five probes or a flap")
            assert http_get(f"{sc.base}/readyz")[0] == 200
            assert not [e for e in log_events(sc.log(), "readiness") if e["ready"] is False]


def _stateless(method: str, request_id: int) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": {}})
    return body, {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                  "MCP-Protocol-Version": "2025-11-25"}


async def test_a_call_never_goes_on_a_connection_the_server_already_closed(tmp_path):
    # The server closes the idle connection (uvicorn's keep-alive, 1 s) and its FIN is waiting in the
    # sidecar's socket, but the event loop has not read it yet when the next call takes the connection.
    with sdk_http_server(keep_alive=1, stateless=True, json_response=True, log_path=tmp_path / "server.log") as url:
        upstream = HttpUpstream(url)
        await upstream.start()
        try:
            first = await upstream.post(*_stateless("tools/list", 1))
            assert first.status == 200 and b'"echo"' in first.body
            idle = upstream._wire._idle
            assert len(idle) == 1
            sock = idle[0].writer.get_extra_info("socket")
            # Blocking on purpose: the event loop must not see the close before the next call.
            readable, _, _ = select.select([sock], [], [], 10)
            assert readable, "the server never closed its idle connection"
            second = await upstream.post(*_stateless("tools/list", 2))
            assert second.status == 200 and b'"echo"' in second.body
        finally:
            await upstream.close()


# -- 8. rate limits count calls -----------------------------------------------------------------------------------


def write_policy(tmp_path, spec: dict) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy",
                                    "metadata": {"name": "contract"}, "spec": spec}))
    return str(path)


def sdk_client(url: str, mode: str = "legacy", **headers: str) -> Client:
    http = create_mcp_http_client(headers=headers or None)
    return Client(streamable_http_client(url, http_client=http), mode=mode)


async def test_a_rate_limit_counts_calls_not_initialize_or_listing(tmp_path):
    # burst 2: the SDK client's initialize and the tools/list it sends after each call to check the
    # output schema used to take the bucket, and its first call_tool() raised on a 429 though the tool ran.
    policy = write_policy(tmp_path, {"rateLimit": {"requestsPerSecond": 0.01, "burst": 2}})
    with sdk_http_server(log_path=tmp_path / "server.log") as upstream, \
            sidecar(["--upstream", upstream], tmp_path, "--policy", policy) as sc:
        async with sdk_client(sc.url) as session:
            assert (await session.list_tools()).tools
            assert (await session.call_tool("echo", {"text": "one"})).content[0].text == "one"
            assert (await session.call_tool("echo", {"text": "two"})).content[0].text == "two"
            await session.send_ping()
            with pytest.raises(MCPError, match="rate limit exceeded"):
                await session.call_tool("echo", {"text": "three"})
        assert metric(sc.base, "toolmesh_rate_limited_total") == 1


async def test_through_the_gateway_a_rate_limit_counts_calls_only(tmp_path):
    """The gateway's own session set-up (initialize, tools/list at the sidecar) used to spend the bucket: with
    burst 2 only one of two quick calls passed."""
    from helpers import async_wait_until
    from helpers.registry_procs import get_json, registry_process

    policy = write_policy(tmp_path, {"rateLimit": {"requestsPerSecond": 0.01, "burst": 2}})
    with sdk_http_server(log_path=tmp_path / "server.log") as upstream, \
            registry_process(tmp_path, secret="s") as registry, \
            sidecar(["--upstream", upstream], tmp_path, "--policy", policy, "--server-name", "limited",
                    "--registry", registry, env={"TOOLMESH_REGISTRY_SECRET": "s"}) as sc:
        async def listed() -> bool:
            return any(t["name"] == "limited__echo" for t in (await get_json(f"{registry}/v1/tools"))["tools"])

        await async_wait_until(listed, timeout=20, what="the sidecar's tools at the gateway")
        async with sdk_client(f"{registry}/mcp") as session:
            assert any(t.name == "limited__echo" for t in (await session.list_tools()).tools)
            assert (await session.call_tool("limited__echo", {"text": "one"})).content[0].text == "one"
            assert (await session.call_tool("limited__echo", {"text": "two"})).content[0].text == "two"
            try:
                refused = (await session.call_tool("limited__echo", {"text": "three"})).is_error
            except MCPError as exc:
                refused = "rate limit" in str(exc)
            assert refused
        assert metric(sc.base, "toolmesh_rate_limited_total") == 1


# -- 3. typed results inside the budget; 4. stateless budgets -------------------------------------------------------


@pytest.fixture(scope="module")
def typed_upstream(tmp_path_factory):
    from helpers.typed_server import typed_http_server

    with typed_http_server(log_path=tmp_path_factory.mktemp("typed") / "server.log") as url:
        yield url


def budget_policy(tmp_path, ttl: float) -> str:
    return write_policy(tmp_path, {"budget": {"totalTokens": 20000, "reservedForResponse": 1000,
                                              "reservedForSystem": 1000, "sessionTtlSeconds": ttl}})


@pytest.fixture(scope="module")
def budgeted(typed_upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budgeted")
    with sidecar(["--upstream", typed_upstream], tmp, "--policy", budget_policy(tmp, ttl=1)) as sc:
        yield sc


def text_of(result) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def test_a_typed_result_is_counted_and_cut_whole(budgeted):
    # 3,000 rows: the text was cut to the budget but structuredContent passed in full (186,805 characters).
    async with sdk_client(budgeted.url) as session:
        result = await session.call_tool("table", {"rows": 3000})  # the SDK client checks it against the schema
        meta = result.meta[BUDGET]
        limit = int(18000 * 0.3)
        assert meta["truncated"] is True and meta["used"] == limit == meta["keptTokens"]
        assert meta["structuredTokens"] > 50000 and meta["resultTokens"] > 2 * meta["structuredTokens"] * 0.9
        structured = result.structured_content
        assert meta["structuredContent"] == "truncated"
        assert 0 < len(structured["rows"]) < 3000 and structured["total"] == 3000
        assert structured["rows"][0] == {"id": 0, "name": "row-0", "note": "note number 0 of the table"}
        from toolmesh.sidecar.chain.stages.tokenizer import Tokenizer

        kept = Tokenizer().count(orjson.dumps(structured).decode()) + Tokenizer().count(text_of(result))
        assert kept <= limit
        links = [c for c in result.content if isinstance(c, ResourceLink)]
        uri = str(links[0].uri)
        first = (await session.read_resource(uri)).contents[0]
        count = first.meta["io.toolmesh/page"]["pages"]
        last = (await session.read_resource(f"{uri}?page={count}")).contents[0]
        assert last.text.endswith('"note":"note number 2999 of the table"}],"total":3000}')


async def test_stateless_calls_without_a_budget_key_are_budgeted_one_by_one(budgeted):
    # Without a session or Mcp-Budget-Key, all of a subject's stateless calls shared one ledger: once it
    # was spent, every call answered [BUDGET EXHAUSTED …] for an hour.
    for _ in range(6):
        async with sdk_client(budgeted.url, mode="2026-07-28") as session:
            result = await session.call_tool("words", {"count": 3000})
            assert "[TRUNCATED:" in text_of(result)
            assert result.meta[BUDGET]["used"] == int(18000 * 0.3)


async def test_refused_calls_do_not_keep_a_spent_budget_alive(budgeted):
    # With a budget key the ledger is shared; spent, it refuses calls, and it must come back
    # sessionTtlSeconds (1 s here) after its last charged call however often the caller is refused.
    key = {"Mcp-Budget-Key": "conversation-1"}
    async with sdk_client(budgeted.url, mode="2026-07-28", **key) as session:
        for _ in range(20):
            result = await session.call_tool("words", {"count": 3000})
            if result.meta[BUDGET].get("exhausted"):
                break
        else:
            pytest.fail("the budget never ran out")
        refused = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            result = await session.call_tool("words", {"count": 5})
            if not result.meta[BUDGET].get("exhausted"):
                break
            refused += 1
            await asyncio.sleep(0.05)  # a caller retrying, not a wait on the sidecar
        else:
            pytest.fail(f"still exhausted after {refused} refused calls over 10 s (ttl 1 s)")
        assert text_of(result) == " ".join(f"w{i}" for i in range(5)) and refused > 0


def test_toolmesh_call_sends_a_budget_key(typed_upstream, tmp_path):
    with sidecar(["--upstream", typed_upstream], tmp_path, "--policy", budget_policy(tmp_path, ttl=3600)) as sc:
        def call(*key: str) -> dict:
            done = toolmesh_cli("call", sc.url, "words", "count=100", *key, "--output", "json", "--mode", "2026-07-28")
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)["_meta"][BUDGET]

        first, second = call("--budget-key", "cli-conversation"), call("--budget-key", "cli-conversation")
        assert second["used"] == first["used"] * 2 > 0
        assert call()["used"] == first["used"]  # no key: the call is budgeted alone


# -- 10. one log line per call, with its trace ----------------------------------------------------------------------

TRACE_HEADER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE_META = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_every_call_is_logged_at_info_with_subject_and_the_traceparent_header(tmp_path):
    issuer = TokenIssuer("log-issuer")
    policy = write_policy(tmp_path, {"auth": issuer.hmac_auth()})
    token = issuer.token("alice", alg="HS256")
    with sdk_http_server(log_path=tmp_path / "server.log") as upstream, \
            sidecar(["--upstream", upstream], tmp_path, "--policy", policy) as sc:
        ok = await post_tools_call(sc.url, "echo", {"text": "hi"}, token=token, request_id=41,
                                   traceparent=TRACE_HEADER)
        assert ok.status_code == 200
        # Both: _meta wins, as MCP says.
        both = orjson.dumps({"jsonrpc": "2.0", "id": 42, "method": "tools/call", "params": {
            "name": "echo", "arguments": {"text": "both"},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities": {}, "traceparent": TRACE_META}}})
        from helpers.stateless_calls import tools_call_headers

        async with httpx2.AsyncClient(timeout=10) as http:
            assert (await http.post(sc.url, content=both, headers=tools_call_headers(
                "echo", token, traceparent=TRACE_HEADER))).status_code == 200
        async with sdk_client(sc.url, Authorization=f"Bearer {token}") as session:
            assert not (await session.call_tool("echo", {"text": "in a session"})).is_error

        def calls() -> list[dict]:
            return [e for e in log_events(sc.log(), "request") if e.get("method") == "tools/call"]
        wait_until(lambda: len(calls()) >= 3, what="three call log lines")
        first, second, third = calls()
        assert first["level"] == "info" and first["outcome"] == "ok" and first["tool"] == "echo"
        assert first["subject"] == "alice" and first["request_id"] == 41 and first["duration_ms"] >= 0
        assert first["trace_id"] == TRACE_HEADER[3:35] and first["session_ref"] is None
        assert second["trace_id"] == TRACE_META[3:35]
        assert third["subject"] == "alice" and re.fullmatch(r"[0-9a-f]{16}", third["session_ref"])
        assert third["session_ref"] not in json.dumps(first)
