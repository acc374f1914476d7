"""The sidecar's upstream HTTP/1.1 client against a loopback server that answers with hand-written bytes."""

from __future__ import annotations

import asyncio

import pytest

from toolmesh.api.http_wire import WireError, WirePool


class CannedServer:
    """Answers each request on a connection with the next canned response; counts connections and requests."""

    def __init__(self, responses: list[bytes], *, close_after: bool = False):
        self.responses = list(responses)
        self.requests: list[bytes] = []
        self.connections = 0
        self.close_after = close_after

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.responses:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                response = self.responses.pop(0)
                if response == b"DROP":
                    break
                if response.startswith(b"STALL"):
                    await asyncio.sleep(30)
                if response.startswith(b"PARTIAL"):
                    # Part of an answer, then an upstream that goes silent mid-body.
                    writer.write(response[len(b"PARTIAL"):])
                    await writer.drain()
                    await asyncio.sleep(30)
                    break
                writer.write(response)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve():
    servers = []

    async def start(responses, **kw):
        canned = CannedServer(responses, **kw)
        server = await asyncio.start_server(canned.handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return canned, WirePool(f"http://127.0.0.1:{port}/mcp?x=1")

    yield start
    for server in servers:
        server.close()


JSON_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nMcp-Session-Id: s1\r\n\r\n{}"
CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"6\r\ndata: \r\n7;ext=1\r\nhello\n\n\r\n0\r\n\r\n")


async def test_content_length_body_and_keep_alive_reuse(serve):
    canned, pool = await serve([JSON_OK, JSON_OK])
    for _ in range(2):
        resp = await pool.request("POST", {"Content-Type": "application/json", "Mcp-Session-Id": "s1"}, b'{"a":1}')
        assert resp.status == 200 and resp.headers["mcp-session-id"] == "s1"
        assert await resp.read() == b"{}"
    assert canned.connections == 1
    first = canned.requests[0]
    assert first.startswith(b"POST /mcp?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Content-Length: 7\r\n" in first and first.endswith(b'{"a":1}')
    pool.close()


async def test_chunked_stream_arrives_in_pieces(serve):
    canned, pool = await serve([CHUNKED])
    resp = await pool.request("GET", {"Accept": "text/event-stream"})
    assert [c async for c in resp.chunks()] == [b"data: ", b"hello\n\n"]
    assert resp.finished
    resp.release()
    pool.close()


async def test_close_delimited_body_and_header_injection_refused(serve):
    canned, pool = await serve([b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnope"], close_after=True)
    resp = await pool.request("DELETE", {"X-Evil": "a\r\nInjected: yes"})
    assert resp.status == 404 and await resp.read() == b"nope"
    assert b"Injected" not in canned.requests[0]
    pool.close()


async def test_dropped_connection_is_a_wire_error_and_not_resent(serve):
    canned, pool = await serve([b"DROP"])
    with pytest.raises(WireError):
        await pool.request("POST", {}, b"{}")
    assert len(canned.requests) == 1
    pool.close()


async def test_silence_times_out_and_refused_connections_fail_fast(serve):
    canned, pool = await serve([b"STALL"])
    with pytest.raises(TimeoutError):
        await pool.request("POST", {}, b"{}", timeout=0.2)
    closed = WirePool("http://127.0.0.1:9/mcp")
    with pytest.raises(WireError):
        await closed.request("POST", {}, b"{}")
    pool.close()


async def test_silence_mid_body_times_out_for_whole_and_streamed_bodies(serve):
    json_head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{\"a\""
    sse_head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"7\r\ndata: 1\r\n")
    canned, pool = await serve([b"PARTIAL" + json_head, b"PARTIAL" + sse_head, b"PARTIAL" + sse_head])
    with pytest.raises(TimeoutError):
        await pool.request("POST", {}, b"{}", timeout=0.2)
    resp = await pool.request("POST", {}, b"{}", timeout=0.2)
    with pytest.raises(TimeoutError):
        await resp.read()
    resp = await pool.request("POST", {}, b"{}", timeout=0.2)
    seen = []
    with pytest.raises(TimeoutError):
        async for chunk in resp.chunks():
            seen.append(chunk)
    assert seen == [b"data: 1"]
    # Each timed-out connection was closed, never handed to the next request.
    assert canned.connections == 3
    pool.close()
