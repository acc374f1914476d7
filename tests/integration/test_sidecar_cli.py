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


async def test_a_sidecar_on_port_0_says_its_port_and_announces_it(tmp_path):
    """`--listen HOST:0 --port-file F`: the kernel picks the port, so no other process can take it between a pick
    and the bind; the file and the heartbeats name the port actually bound (`toolmesh up` relies on both)."""
    from helpers import TOOLMESH, async_wait_until, running, wait_until
    from helpers.registry_procs import get_json, registry_process
    from helpers.sidecar import ready

    port_file = tmp_path / "sidecar.port"
    with sdk_http_server(log_path=tmp_path / "up.log") as url, registry_process(tmp_path, secret="s") as registry, \
            running([TOOLMESH, "sidecar", "--upstream", url, "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                     "--server-name", "zero", "--registry", registry], env={"TOOLMESH_REGISTRY_SECRET": "s"},
                    log_path=tmp_path / "sidecar.log") as proc:
        wait_until(lambda: proc.poll() is not None or port_file.exists(), timeout=20, what="the port file")
        assert proc.poll() is None, (tmp_path / "sidecar.log").read_text()
        port = int(port_file.read_text())
        assert port > 0
        wait_until(lambda: ready(f"http://127.0.0.1:{port}"), timeout=20, what="the sidecar ready on its port")

        async def announced() -> bool:
            servers = (await get_json(f"{registry}/v1/servers"))["servers"]
            return any(i.get("endpoint") == f"http://127.0.0.1:{port}/mcp"
                       for s in servers for i in s.get("instances", []))

        await async_wait_until(announced, timeout=20, what="the bound port in the heartbeats")
