"""What a hostile or broken peer meets at the sidecar: limits, malformed input, foreign origins, dead and slow upstreams."""

from __future__ import annotations

import asyncio
import random

import httpx2
import orjson
import pytest
from aiohttp import web

from helpers import async_wait_until, free_port
from helpers.mcp_servers import sdk_http_server
from helpers.sidecar import http_get, sidecar

ACCEPT = "application/json, text/event-stream"
JSON = {"Content-Type": "application/json", "Accept": ACCEPT}
STATELESS_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
               "io.modelcontextprotocol/clientCapabilities": {},
               "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"}}


def stateless_call(tool: str, arguments: dict, request_id=1) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": STATELESS_META}}


def stateless_headers(tool: str) -> dict:
    return {**JSON, "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": tool}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with sdk_http_server(stateless=True, json_response=True,
                         log_path=tmp_path_factory.mktemp("up") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def proxied(upstream, tmp_path_factory):
    with sidecar(["--upstream", upstream], tmp_path_factory.mktemp("sc"), "--max-body-bytes", "2000",
                 "--upstream-timeout", "1", "--body-timeout", "1") as sc:
        yield sc


async def post(url: str, content: bytes, headers: dict, timeout: float = 10) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=timeout) as http:
        return await http.post(url, content=content, headers=headers)


def error_of(resp: httpx2.Response) -> dict:
    body = resp.json()
    assert body["jsonrpc"] == "2.0"
    return body["error"]


async def test_body_over_the_limit_is_413_with_a_jsonrpc_error(proxied):
    big = orjson.dumps(stateless_call("echo", {"text": "x" * 5000}))
    resp = await post(proxied.url, big, stateless_headers("echo"))
    assert resp.status_code == 413
    assert error_of(resp)["code"] == -32600
    # Chunked, so the length is not known up front.
    async def chunks():
        for _ in range(10):
            yield b" " * 500
    async with httpx2.AsyncClient(timeout=10) as http:
        resp = await http.post(proxied.url, content=chunks(), headers=stateless_headers("echo"))
    assert resp.status_code == 413


async def test_malformed_json_is_a_parse_error(proxied):
    resp = await post(proxied.url, b'{"jsonrpc": "2.0", "id": 1, "method": ', JSON)
    assert resp.status_code == 400
    assert error_of(resp)["code"] == -32700


@pytest.mark.parametrize("body", [b'{"id": 1}', b'"text"', b"[]", b'{"jsonrpc": "2.0", "id": [1], "method": "ping"}',
                                  b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}', b'{"jsonrpc":"2.0","id":1,"method":"x","params":3}'])
async def test_invalid_jsonrpc_is_an_invalid_request(proxied, body):
    resp = await post(proxied.url, body, JSON)
    assert resp.status_code == 400
    assert error_of(resp)["code"] == -32600


async def test_wrong_content_type_is_415(proxied):
    resp = await post(proxied.url, orjson.dumps(stateless_call("echo", {"text": "a"})),
                      {**stateless_headers("echo"), "Content-Type": "text/plain"})
    assert resp.status_code == 415
    assert error_of(resp)["code"] == -32600


async def test_unacceptable_accept_is_406(proxied):
    resp = await post(proxied.url, orjson.dumps(stateless_call("echo", {"text": "a"})),
                      {**stateless_headers("echo"), "Accept": "text/html"})
    assert resp.status_code == 406
    async with httpx2.AsyncClient(timeout=10) as http:
        resp = await http.get(proxied.url, headers={"Accept": "application/json"})
    assert resp.status_code == 406


@pytest.mark.parametrize("origin,status", [("https://evil.example", 403), ("http://localhost:3000", 200),
                                           ("http://127.0.0.1:8080", 200), (None, 200)])
async def test_origin_checked_against_localhost_by_default(proxied, origin, status):
    headers = stateless_headers("echo")
    if origin:
        headers["Origin"] = origin
    resp = await post(proxied.url, orjson.dumps(stateless_call("echo", {"text": "o"})), headers)
    assert resp.status_code == status
    if status == 403:
        assert error_of(resp)["message"] == "origin not allowed"
    else:
        assert resp.json()["result"]["content"][0]["text"] == "o"


async def test_explicit_allowed_origin_replaces_the_default(upstream, tmp_path):
    with sidecar(["--upstream", upstream], tmp_path, "--allowed-origin", "https://app.example") as sc:
        body = orjson.dumps(stateless_call("echo", {"text": "o"}))
        ok = await post(sc.url, body, {**stateless_headers("echo"), "Origin": "https://app.example"})
        assert ok.status_code == 200
        local = await post(sc.url, body, {**stateless_headers("echo"), "Origin": "http://localhost:3000"})
        assert local.status_code == 403


async def test_upstream_down_is_502_with_a_jsonrpc_error(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    with sidecar(["--upstream", dead], tmp_path, wait_ready=False) as sc:
        resp = await post(sc.url, orjson.dumps(stateless_call("echo", {"text": "a"}, request_id=41)), stateless_headers("echo"))
        assert resp.status_code == 502
        body = resp.json()
        assert body["id"] == 41
        assert body["error"]["code"] == -32001
        assert http_get(f"{sc.base}/healthz")[0] == 200
        assert http_get(f"{sc.base}/readyz")[0] == 503


async def test_silent_upstream_is_504(proxied):
    resp = await post(proxied.url, orjson.dumps(stateless_call("slow", {"seconds": 3}, request_id="t")),
                      stateless_headers("slow"))
    assert resp.status_code == 504
    assert resp.json()["id"] == "t"
    assert resp.json()["error"]["code"] == -32002


async def test_silent_streaming_upstream_ends_with_a_timeout_event(tmp_path):
    with sdk_http_server() as url:
        with sidecar(["--upstream", url], tmp_path, "--upstream-timeout", "1") as sc:
            from mcp import Client

            async with Client(sc.url, mode="legacy") as client:
                with pytest.raises(Exception) as failure:
                    await client.call_tool("slow", {"seconds": 3})
            assert "did not answer" in str(failure.value) or "silent" in str(failure.value)


async def test_client_disconnect_closes_the_upstream_request(tmp_path):
    """In the stateless era closing the response stream is the cancellation; the upstream must see it."""
    seen = {"started": asyncio.Event(), "gone": asyncio.Event()}

    async def hanging_mcp(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("method") == "initialize":  # the readiness probe
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {
                "protocolVersion": "2025-11-25", "capabilities": {}, "serverInfo": {"name": "h", "version": "1"}}})
        seen["started"].set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen["gone"].set()
            raise
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/mcp", hanging_mcp)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        # The fake upstream runs on this test's event loop: wait for readiness without blocking it.
        with sidecar(["--upstream", f"http://127.0.0.1:{port}/mcp"], tmp_path, wait_ready=False) as sc:
            async with httpx2.AsyncClient(timeout=30) as http:
                async def ready():
                    return (await http.get(f"{sc.base}/readyz")).status_code == 200

                await async_wait_until(ready, timeout=20, what="sidecar ready")
                task = asyncio.create_task(http.post(sc.url, content=orjson.dumps(stateless_call("slow", {})),
                                                     headers=stateless_headers("slow")))
                await asyncio.wait_for(seen["started"].wait(), 10)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            await asyncio.wait_for(seen["gone"].wait(), 10)
    finally:
        await runner.cleanup()


async def test_garbage_never_crashes_or_hangs_the_proxy(proxied):
    rng = random.Random(7)
    samples = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(40)]
    samples += [b"{" * 1500, b"[" * 1500, b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}',
                b'[{"jsonrpc":"2.0","id":1}]', b'\xff\xfe', b"null", b"1e999999"]
    async with httpx2.AsyncClient(timeout=10) as http:
        for body in samples:
            resp = await http.post(proxied.url, content=body, headers=JSON)
            assert resp.status_code < 500 or resp.status_code in (502, 504), body
    assert http_get(f"{proxied.base}/healthz")[0] == 200
    resp = await post(proxied.url, orjson.dumps(stateless_call("echo", {"text": "still here"})), stateless_headers("echo"))
    assert resp.json()["result"]["content"][0]["text"] == "still here"


async def test_stalled_upload_gets_408_and_the_proxy_keeps_serving(proxied):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxied.port)
    writer.write(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Accept: application/json, text/event-stream\r\nContent-Length: 500\r\n\r\n{\"jsonrpc\":")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    resp = await post(proxied.url, orjson.dumps(stateless_call("echo", {"text": "after"})), stateless_headers("echo"))
    assert resp.json()["result"]["content"][0]["text"] == "after"
