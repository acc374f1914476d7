"""What `toolmesh up` shows for observing it: each sidecar's /metrics in the table (every series the Grafana dashboard
queries among them), and traces relayed to a collector of the user's with `--otlp-relay`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from mcp.client import Client
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from helpers import ROOT, TOOLMESH, async_wait_until, free_port, running, wait_until

TOY = str(ROOT / "tests" / "helpers" / "toy_mcp_server.py")
DASHBOARD = ROOT / "docs" / "grafana" / "toolmesh-sidecar.json"
REGISTRY_DASHBOARD = ROOT / "docs" / "grafana" / "toolmesh-registry.json"

EVERY_SECTION = {
    "auth": {"issuers": [{"issuer": "https://issuer.test", "audiences": ["toolmesh"],
                          "secret": "a-test-secret-that-is-long-enough-for-hs256"}]},
    "authorization": {"defaultScopes": []},
    "rateLimit": {"requestsPerSecond": 100, "burst": 100},
    "cache": {"ttlSeconds": 60},
    "budget": {},
    "retry": {"maxAttempts": 2},
    "circuitBreaker": {"failureThreshold": 5, "openSeconds": 30},
    "timeouts": {"callSeconds": 30},
}


def write_manifests(folder: Path, policy: dict | None = None) -> None:
    folder.mkdir()
    docs = [{"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
             "metadata": {"name": "alpha", "labels": {"team": "demo"}},
             "spec": {"command": [sys.executable, TOY], "args": ["--name", "alpha", "--port", "$(PORT)"]}}]
    if policy is not None:
        docs.append({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": "all"},
                     "spec": {"selector": {"matchLabels": {"team": "demo"}}, **policy}})
    (folder / "alpha.yaml").write_text(yaml.safe_dump_all(docs))


def dashboard_series(dashboard: Path = DASHBOARD) -> set[str]:
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p.get("targets", [])]
    assert exprs
    names = {n for e in exprs for n in re.findall(r"\b((?:toolmesh|mcp)_[a-z0-9_]+)\s*[{\[]", e)}
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith("mcp_") else n for n in names}


async def test_the_table_links_each_sidecars_metrics_which_serve_every_series_the_dashboard_queries(tmp_path):
    folder = tmp_path / "manifests"
    write_manifests(folder, EVERY_SECTION)
    port = free_port()
    log = tmp_path / "up.log"
    cmd = [TOOLMESH, "up", str(folder), "--listen", f"127.0.0.1:{port}", "--heartbeat-interval", "0.2",
           "--log-dir", str(tmp_path / "logs")]
    with running(cmd, log_path=log) as proc:
        wait_until(lambda: "==> running" in log.read_text() or proc.poll() is not None, timeout=60, what="the table")
        text = log.read_text()
        row = re.search(r"^alpha\s+streamable-http\s+ready\s+\d+\s+0\s+(\S+)/mcp\s+(\S+)$", text, re.M)
        assert row and row[2] == row[1] + "/metrics", text
        async with aiohttp.ClientSession() as http, http.get(row[2]) as resp:
            assert resp.status == 200 and resp.content_type == "text/plain"
            served = set(re.findall(r"^# TYPE (\S+) ", await resp.text(), re.M))
        # The registry's own series, with the credential the table names.
        assert f"http://127.0.0.1:{port}/metrics" in text
        secret = (tmp_path / "logs" / "registry.secret").read_text().strip()
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {secret}"}) as resp:
            assert resp.status == 200 and "# TYPE toolmesh_gateway_" in await resp.text()
            registry_served = set(re.findall(r"^# TYPE (\S+) ", await resp.text(), re.M))
    registry_wanted = dashboard_series(REGISTRY_DASHBOARD)
    assert {"toolmesh_gateway_calls_total", "toolmesh_registry_heartbeats_total"} <= registry_wanted
    assert registry_wanted - registry_served == set(), sorted(registry_wanted - registry_served)
    wanted = dashboard_series()
    assert {"toolmesh_requests_total", "mcp_server_operation_duration_seconds", "toolmesh_auth_requests_total",
            "toolmesh_authz_decisions_total", "toolmesh_cache_lookups_total", "toolmesh_budget_tokens_total",
            "toolmesh_circuit_breaker_state", "toolmesh_retries_total"} <= wanted
    assert wanted - served == set(), f"the dashboard queries series no sidecar serves: {sorted(wanted - served)}"


async def test_otlp_relay_passes_the_sidecars_spans_on_to_a_collector(tmp_path):
    spans: list[tuple[str, str]] = []

    async def collect(request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            spans.extend((service, s.name) for scope in resource_spans.scope_spans for s in scope.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    collector = free_port()
    await web.TCPSite(runner, "127.0.0.1", collector).start()
    try:
        folder = tmp_path / "manifests"
        write_manifests(folder)
        port = free_port()
        log = tmp_path / "up.log"
        cmd = [TOOLMESH, "up", str(folder), "--listen", f"127.0.0.1:{port}", "--heartbeat-interval", "0.2",
               "--log-dir", str(tmp_path / "logs"), "--otlp-relay", f"http://127.0.0.1:{collector}"]
        # The sidecar sends its batch of spans every 200 ms rather than every 5 s.
        with running(cmd, log_path=log, env={"OTEL_BSP_SCHEDULE_DELAY": "200"}) as proc:
            await async_wait_until(lambda: _ready(log, proc), timeout=60, what="the table")
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
                assert not (await client.call_tool("alpha__echo", {"message": "traced"})).is_error

            async def relayed():
                return ("toolmesh-sidecar/alpha", "tools/call echo") in spans

            await async_wait_until(relayed, timeout=30, what=f"the call's span at the collector (got {spans})")
    finally:
        await runner.cleanup()


async def _ready(log: Path, proc) -> bool:
    text = log.read_text()
    assert proc.poll() is None, text
    return "==> running" in text
