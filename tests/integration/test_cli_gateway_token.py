"""The README's agent-developer commands: `toolmesh tools` and `toolmesh call` through the gateway with `--token`.

The sidecar behind the gateway checks the token; the commands show what a user sees with a good token, with
one that lacks the scope, and with none.
"""

from __future__ import annotations

import asyncio

import yaml

from helpers import async_wait_until, toolmesh_cli
from helpers.registry_procs import get_json, registry_process, toy_server
from helpers.sidecar import sidecar
from helpers.tokens import TokenIssuer

SECRET = "heartbeat-secret"


async def test_tools_and_call_through_the_gateway_with_a_token(tmp_path):
    issuer = TokenIssuer("internal-ci")
    (tmp_path / "jwt-secret").write_text(issuer.secret)
    policy = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": "guard"},
              "spec": {"auth": {"issuers": [{"issuer": "internal-ci", "audiences": ["toolmesh"],
                                             "algorithms": ["HS256"], "secretFile": str(tmp_path / "jwt-secret")}]},
                       "authorization": {"rules": [{"tools": ["echo"], "scopes": ["echo:call"]}]}}}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    with (registry_process(tmp_path, secret=SECRET) as registry,
          toy_server(tmp_path, "alpha") as (_, upstream),
          sidecar(["--upstream", upstream], tmp_path, "--server-name", "alpha", "--registry", registry,
                  "--policy", str(tmp_path / "policy.yaml"), env={"TOOLMESH_REGISTRY_SECRET": SECRET})):
        async def listed():
            return [t["name"] for t in (await get_json(f"{registry}/v1/tools"))["tools"]] == ["alpha__echo"]

        await async_wait_until(listed, timeout=15, what="alpha's tools in the registry")
        gateway = f"{registry}/mcp"
        allowed = issuer.token("alice", "echo:call", alg="HS256")
        denied = issuer.token("mallory", "other:scope", alg="HS256")

        tools = toolmesh_cli("tools", gateway, "--token", allowed)
        assert tools.returncode == 0, tools.stderr
        assert any(line.startswith("alpha__echo ") for line in tools.stdout.splitlines()), tools.stdout
        call = toolmesh_cli("call", gateway, "alpha__echo", "message=hello", "--token", allowed)
        assert call.returncode == 0, call.stderr
        assert call.stdout.strip() == "alpha:hello"

        # Without the scope the tool is not listed, and a call by name is refused with the reason.
        tools = toolmesh_cli("tools", gateway, "--token", denied)
        assert tools.returncode == 0, tools.stderr
        assert "alpha__echo" not in tools.stdout
        call = toolmesh_cli("call", gateway, "alpha__echo", "message=no", "--token", denied)
        assert call.returncode == 1 and "scope" in call.stderr.lower(), (call.stdout, call.stderr)
        # The registry's recent figures per tool show only to holders of its credential.
        secret_file = tmp_path / "registry.secret"
        secret_file.write_text(SECRET)

        def red_figures_shown() -> bool:
            shown = toolmesh_cli("tools", gateway, "--token", allowed,
                                 env={"TOOLMESH_REGISTRY_SECRET_FILE": str(secret_file)})
            return "calls," in shown.stdout

        await async_wait_until(lambda: asyncio.to_thread(red_figures_shown), timeout=20, what="RED figures listed")
        assert "calls," not in toolmesh_cli("tools", gateway, "--token", allowed).stdout
        # Without a token the sidecar asks for one.
        call = toolmesh_cli("call", gateway, "alpha__echo", "message=anonymous")
        assert call.returncode == 1 and ("token" in call.stderr.lower() or "401" in call.stderr), call.stderr
