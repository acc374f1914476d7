"""Health, readiness from a real MCP probe, and the Prometheus metrics a scraper sees."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mcp import Client

from helpers import free_port, wait_until
from helpers.mcp_servers import sdk_http_server
from helpers.sidecar import http_get, readyz, sidecar


def test_readyz_follows_the_upstream_down_and_back(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    with sidecar(["--upstream", url], tmp_path, "--probe-interval", "0.2", wait_ready=False) as sc:
        assert http_get(f"{sc.base}/healthz")[0] == 200
        wait_until(lambda: readyz(sc.base)[0] == 503, timeout=10, what="/readyz 503 with no upstream")
        with sdk_http_server(port=port, log_path=tmp_path / "first.log"):
            wait_until(lambda: readyz(sc.base)[0] == 200, timeout=15, what="/readyz 200 once the upstream is up")
            assert readyz(sc.base)[1]["ready"] is True
        wait_until(lambda: readyz(sc.base)[0] == 503, timeout=10, what="/readyz 503 after the upstream died")
        status, body = readyz(sc.base)
        assert body["ready"] is False and body["reason"]
        assert http_get(f"{sc.base}/healthz")[0] == 200
        with sdk_http_server(port=port, log_path=tmp_path / "second.log"):
            wait_until(lambda: readyz(sc.base)[0] == 200, timeout=15, what="/readyz 200 after the upstream restarted")


class _NotMcp(BaseHTTPRequestHandler):
    """Answers every request with 200 and a web page: open port, no MCP."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = b"<html>hello</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args):
        pass


def test_readyz_is_not_a_tcp_check(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotMcp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/mcp"
        with sidecar(["--upstream", url], tmp_path, "--probe-interval", "0.2", wait_ready=False) as sc:
            wait_until(lambda: readyz(sc.base)[1].get("reason") not in (None, "not probed yet"),
                       timeout=10, what="a probe of the web server")
            assert readyz(sc.base)[0] == 503
    finally:
        server.shutdown()
        server.server_close()


async def test_metrics_count_calls_by_method_tool_and_outcome(tmp_path):
    with sdk_http_server(log_path=tmp_path / "up.log") as url:
        with sidecar(["--upstream", url], tmp_path) as sc:
            async with Client(sc.url, mode="legacy") as client:
                await client.list_tools()
                for _ in range(3):
                    await client.call_tool("echo", {"text": "m"})
                await client.call_tool("fail", {})
            status, body = http_get(f"{sc.base}/metrics")
            text = body.decode()
    assert status == 200
    assert 'toolmesh_requests_total{method="tools/call",tool="echo",outcome="ok"} 3' in text
    assert 'toolmesh_requests_total{method="tools/call",tool="fail",outcome="tool_error"} 1' in text
    assert 'toolmesh_requests_total{method="tools/list",tool="",outcome="ok"} 1' in text
    assert 'mcp_server_operation_duration_seconds_count{method="tools/call",tool="echo"} 3' in text
    assert "toolmesh_requests_in_flight 0" in text
    assert "toolmesh_upstream_up 1" in text
