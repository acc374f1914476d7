"""Policy reload through the real sidecar: a valid new policy governs new calls, an invalid one is logged and ignored, ConfigMap symlink swaps are seen."""

from __future__ import annotations

import os
from pathlib import Path

import httpx2
import orjson
import pytest
import yaml

from helpers import wait_until
from helpers.mcp_servers import sdk_http_server
from helpers.stateless_calls import tools_call, tools_call_headers
from helpers.sidecar import readyz, sidecar
from helpers.tokens import TokenIssuer

FAST_POLL = {"TOOLMESH_POLICY_POLL_SECONDS": "0.05"}


@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer("reload-issuer")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with sdk_http_server(log_path=tmp_path_factory.mktemp("up") / "server.log") as url:
        yield url


def policy_text(issuer: TokenIssuer, echo_scopes: list[str], burst: int = 1000) -> str:
    return yaml.safe_dump({
        "apiVersion": "toolmesh.io/v1alpha1",
        "kind": "MCPToolPolicy",
        "metadata": {"name": "reload"},
        "spec": {
            "auth": issuer.hmac_auth(),
            "authorization": {"rules": [{"tools": ["echo"], "scopes": echo_scopes}]},
            "rateLimit": {"requestsPerSecond": 1000, "burst": burst},
        },
    })


def call_status(url: str, token: str, tool: str = "echo") -> int:
    resp = httpx2.post(url, content=orjson.dumps(tools_call(tool, {"text": "x"})), timeout=10,
                       headers=tools_call_headers(tool, token))
    return resp.status_code


def replace_file(path: Path, text: str) -> None:
    """Write next to the file and rename over it, as editors and config tools do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_valid_policy_swaps_in_and_invalid_one_is_ignored(upstream, issuer, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(issuer, ["a"]))
    token_a, token_b = issuer.token("u", "a", alg="HS256"), issuer.token("u", "b", alg="HS256")
    with sidecar(["--upstream", upstream], tmp_path, "--policy", str(path), env=FAST_POLL) as sc:
        assert call_status(sc.url, token_a) == 200
        assert call_status(sc.url, token_b) == 403
        generation = readyz(sc.base)[1]["policyGeneration"]

        path.write_text(policy_text(issuer, ["b"]))  # edited in place
        wait_until(lambda: call_status(sc.url, token_b) == 200, timeout=10, what="the new policy to take effect")
        assert call_status(sc.url, token_a) == 403
        assert readyz(sc.base)[1]["policyGeneration"] == generation + 1

        replace_file(path, policy_text(issuer, ["b"]).replace("requestsPerSecond: 1000", "requestsPerSecond: -1"))
        wait_until(lambda: "ignoring the new policy" in sc.log(), timeout=10, what="the invalid policy to be logged")
        assert "rateLimit.requestsPerSecond" in sc.log()
        assert call_status(sc.url, token_b) == 200 and call_status(sc.url, token_a) == 403
        assert readyz(sc.base)[1]["policyGeneration"] == generation + 1

        replace_file(path, "auth: [unclosed\n")
        wait_until(lambda: sc.log().count("ignoring the new policy") >= 2, timeout=10, what="bad YAML to be logged")
        assert call_status(sc.url, token_b) == 200

        replace_file(path, policy_text(issuer, ["a", "b"]))
        wait_until(lambda: call_status(sc.url, token_a) == 200, timeout=10, what="a valid policy after invalid ones")
        assert sc.proc.poll() is None


def configmap_version(root: Path, version: str, text: str) -> None:
    """What the kubelet does on a ConfigMap update: a new timestamped directory, then an atomic `..data` swap."""
    data = root / f"..{version}"
    data.mkdir()
    (data / "policy.yaml").write_text(text)
    os.symlink(data.name, root / "..data_tmp")
    os.replace(root / "..data_tmp", root / "..data")
    if not (root / "policy.yaml").is_symlink():
        os.symlink("..data/policy.yaml", root / "policy.yaml")


@pytest.mark.parametrize("target", ["directory", "file"])
def test_configmap_symlink_swap_is_seen(upstream, issuer, tmp_path, target):
    mount = tmp_path / "policy"
    mount.mkdir()
    configmap_version(mount, "2026_11_25_10_00_00.1", policy_text(issuer, ["a"]))
    token_a, token_b = issuer.token("u", "a", alg="HS256"), issuer.token("u", "b", alg="HS256")
    # The operator's sidecar reads <mount>/policy.yaml; a directory works too.
    policy_arg = str(mount / "policy.yaml") if target == "file" else str(mount)
    with sidecar(["--upstream", upstream], tmp_path, "--policy", policy_arg, env=FAST_POLL) as sc:
        assert call_status(sc.url, token_a) == 200 and call_status(sc.url, token_b) == 403
        configmap_version(mount, "2026_11_25_10_05_00.2", policy_text(issuer, ["b"]))
        wait_until(lambda: call_status(sc.url, token_b) == 200, timeout=10, what="the swapped ConfigMap to apply")
        assert call_status(sc.url, token_a) == 403


def test_invalid_policy_at_start_is_a_usage_error(upstream, tmp_path):
    import subprocess

    from helpers import TOOLMESH

    path = tmp_path / "policy.yaml"
    path.write_text("retry: {maxAtempts: 3}\n")
    result = subprocess.run([TOOLMESH, "sidecar", "--upstream", upstream, "--listen", "127.0.0.1:0", "--policy", str(path)],
                            capture_output=True, text=True, timeout=30, env=dict(os.environ))
    assert result.returncode == 2
    assert "retry.maxAtempts" in result.stderr and str(path) in result.stderr
