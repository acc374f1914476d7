"""What a rendered pod would run, run here: the sidecar container's command and arguments exactly as rendered
(only the listen and upstream addresses and the mounted paths substituted), with the policy file as rendered,
in front of a real MCP server — and a tool called through it."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt

from helpers import ROOT, TOOLMESH, free_port, port_open, running, wait_until
from toolmesh.operator.inject import POLICY_DIR, SIDECAR_NAME, STDIO_DIR
from toolmesh.operator.merge import PolicySource
from toolmesh.operator.render import SERVER_CONTAINER, OperatorConfig, render_server

SECRET = "fidelity-secret-0123456789abcdef0123456789"
CONFIG = OperatorConfig(sidecar_image="ghcr.io/toolmesh/toolmesh:0.1.0", registry_url=None)
ACCEPT = "application/json, text/event-stream"


def server(name: str, **spec) -> dict:
    return {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "spec": spec,
            "metadata": {"name": name, "namespace": "team-a", "uid": "u-1", "generation": 1, "labels": {"app": name}}}


AUTH_POLICY = PolicySource.from_body({"metadata": {"name": "auth"}, "spec": {
    "auth": {"issuers": [{"issuer": "https://issuer.test", "audiences": ["toolmesh"], "secret": SECRET}]}}})


def rendered_pod(body: dict, policies=()) -> tuple[dict, dict, str]:
    """(sidecar container, server container, policy.yaml) of the rendered Deployment."""
    rendered = render_server(body, list(policies), CONFIG)
    by_kind = {m["kind"]: m for m in rendered.manifests}
    spec = by_kind["Deployment"]["spec"]["template"]["spec"]
    sidecar = next(c for c in spec["initContainers"] if c["name"] == SIDECAR_NAME)
    main = next(c for c in spec["containers"] if c["name"] == SERVER_CONTAINER)
    return sidecar, main, by_kind["ConfigMap"]["data"]["policy.yaml"]


def localise(argv: list[str], replacements: dict[str, str]) -> list[str]:
    """The container's argv with the image's `toolmesh` and the pod-only addresses and paths replaced."""
    out = []
    for arg in argv:
        for old, new in replacements.items():
            arg = arg.replace(old, new)
        out.append(arg)
    return [TOOLMESH if out[0] == "toolmesh" else out[0], *out[1:]]


def post(url: str, message: dict, headers: dict | None = None) -> tuple[int, dict, list[dict]]:
    """POST one JSON-RPC message; (status, response headers, JSON-RPC messages from a JSON or SSE body)."""
    request = urllib.request.Request(url, data=json.dumps(message).encode(), method="POST", headers={
        "Content-Type": "application/json", "Accept": ACCEPT, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=20) as resp:
            status, head, body = resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), []
    if head.get("Content-Type", "").startswith("text/event-stream"):
        messages = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:") and line[5:].strip()]
    else:
        messages = [json.loads(body)] if body.strip() else []
    return status, head, messages


def call_tool(url: str, tool: str, arguments: dict, headers: dict | None = None) -> dict:
    """A whole session: initialize, initialized, tools/call; returns the call's result."""
    headers = dict(headers or {})
    status, head, _ = post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "fidelity", "version": "1"}}},
        headers)
    assert status == 200, f"initialize answered {status}"
    session = {k: v for k, v in head.items() if k.lower() == "mcp-session-id"}
    headers.update(session)
    headers["MCP-Protocol-Version"] = "2025-06-18"
    post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
    status, _, messages = post(url, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                     "params": {"name": tool, "arguments": arguments}}, headers)
    assert status == 200, f"tools/call answered {status}"
    return next(m for m in messages if m.get("id") == 2)["result"]


def token() -> str:
    now = int(time.time())
    return jwt.encode({"iss": "https://issuer.test", "aud": "toolmesh", "sub": "alice", "iat": now,
                       "exp": now + 600}, SECRET, algorithm="HS256")


def test_http_pod_sidecar_enforces_the_rendered_policy_in_front_of_the_server(tmp_path: Path):
    upstream_port, listen_port = free_port(), free_port()
    sidecar, main, policy_text = rendered_pod(server("alpha", image="example.org/alpha:1", port=8080),
                                              [AUTH_POLICY])
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    (policy_dir / "policy.yaml").write_text(policy_text)
    argv = localise(sidecar["command"] + sidecar["args"], {
        "0.0.0.0:7400": f"127.0.0.1:{listen_port}",
        "127.0.0.1:8080": f"127.0.0.1:{upstream_port}",
        POLICY_DIR: str(policy_dir),
    })
    assert argv[1:3] == ["sidecar", "--listen"], argv
    toy = [sys.executable, str(ROOT / "tests" / "helpers" / "toy_mcp_server.py"), "--name", "alpha",
           "--port", str(upstream_port), "--tools", "echo"]
    with running(toy, log_path=tmp_path / "server.log"), \
            running(argv, log_path=tmp_path / "sidecar.log") as proc:
        wait_until(lambda: port_open(upstream_port), timeout=20, what="the MCP server to listen")
        wait_until(lambda: proc.poll() is not None or port_open(listen_port), timeout=20, what="the sidecar to listen")
        assert proc.poll() is None, (tmp_path / "sidecar.log").read_text()
        url = f"http://127.0.0.1:{listen_port}/mcp"
        status, head, _ = post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}})
        assert status == 401 and "Bearer" in head.get("WWW-Authenticate", ""), "the rendered auth policy is enforced"
        result = call_tool(url, "echo", {"message": "hi"}, {"Authorization": f"Bearer {token()}"})
        assert result["content"][0]["text"] == "alpha:hi"


def test_stdio_pod_server_on_fifos_bridged_by_the_sidecar(tmp_path: Path):
    listen_port = free_port()
    sidecar, main, policy_text = rendered_pod(server("time", transport="stdio", command=["mcp-server-time"],
                                                     args=["--local-timezone", "UTC"]))
    fifo_dir = tmp_path / "stdio"
    fifo_dir.mkdir()
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    (policy_dir / "policy.yaml").write_text(policy_text)
    # The emptyDir is a local directory here; the server container's env and command are used as rendered.
    env = {e["name"]: e["value"].replace(STDIO_DIR, str(fifo_dir)) for e in main.get("env", [])}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    argv = localise(sidecar["command"] + sidecar["args"], {
        "0.0.0.0:7400": f"127.0.0.1:{listen_port}", STDIO_DIR: str(fifo_dir), POLICY_DIR: str(policy_dir)})
    assert "--upstream-fifo-dir" in argv
    with running(main["command"], env=env, log_path=tmp_path / "server.log"), \
            running(argv, log_path=tmp_path / "sidecar.log") as proc:
        wait_until(lambda: proc.poll() is not None or port_open(listen_port), timeout=20, what="the sidecar to listen")
        assert proc.poll() is None, (tmp_path / "sidecar.log").read_text()
        url = f"http://127.0.0.1:{listen_port}/mcp"
        result = call_tool(url, "get_current_time", {"timezone": "UTC"})
        assert json.loads(result["content"][0]["text"])["timezone"] == "UTC"
