"""The command line a user types: `toolmesh sidecar` flags, `toolmesh tools` and `toolmesh call` through a sidecar."""

from __future__ import annotations

import pytest

from helpers import toolmesh_cli
from helpers.mcp_servers import sdk_http_server
from helpers.sidecar import sidecar


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    with sdk_http_server(log_path=tmp / "up.log") as url, sidecar(["--upstream", url], tmp) as sc:
        yield sc


def test_tools_lists_names_descriptions_and_hints(proxied):
    done = toolmesh_cli("tools", proxied.url)
    assert done.returncode == 0, done.stderr
    echo = next(line for line in done.stdout.splitlines() if line.startswith("echo "))
    assert "Return the text unchanged." in echo and "read-only" in echo and "idempotent" in echo


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28", "auto"])
def test_call_prints_the_result(proxied, mode):
    done = toolmesh_cli("call", proxied.url, "add", "a=40", "b=2", "--mode", mode)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"


def test_call_with_json_arguments_and_tool_error(proxied):
    done = toolmesh_cli("call", proxied.url, "echo", "--json", '{"text": "from json"}')
    assert done.stdout.strip() == "from json"
    failed = toolmesh_cli("call", proxied.url, "fail", "reason=bad")
    assert failed.returncode == 1
    assert "Error executing tool fail" in failed.stderr


def test_call_reports_bad_arguments_and_unreachable_servers():
    bad = toolmesh_cli("call", "http://127.0.0.1:9/mcp", "add", "a")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    down = toolmesh_cli("call", "http://127.0.0.1:9/mcp", "add", "a=1")
    assert down.returncode == 1 and "127.0.0.1:9" in down.stderr


@pytest.mark.parametrize("args,reason", [
    (["--upstream", "ftp://example/mcp"], "http(s) URL"),
    (["--upstream", "http://127.0.0.1:9/mcp", "--listen", "nowhere"], "HOST:PORT"),
    (["--upstream", "http://127.0.0.1:9/mcp", "--max-body-bytes", "0"], "positive"),
])
def test_sidecar_refuses_bad_configuration_with_exit_2(args, reason):
    done = toolmesh_cli("sidecar", *args)
    assert done.returncode == 2
    assert reason in done.stderr
