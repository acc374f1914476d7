"""A policy's `secretRef`: the operator mounts that Secret's key into the sidecar and the sidecar reads it as a file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from helpers.tokens import TokenIssuer
from multidict import CIMultiDict

from toolmesh.api.policy import PolicyError, PolicyFile
from toolmesh.operator.inject import POLICY_SECRETS_DIR, SIDECAR_NAME, TOKEN_DIR
from toolmesh.operator.merge import PolicySource
from toolmesh.operator.render import MissingSecret, OperatorConfig, render_server, secret_keys_of
from toolmesh.sidecar.chain.frame import CallContext, Outcome, run_chain
from toolmesh.sidecar.chain.stages import authenticate
from toolmesh.sidecar.chain.state import SharedState

CONFIG = OperatorConfig(sidecar_image="ghcr.io/toolmesh/toolmesh:0.1.0",
                        registry_url="http://toolmesh-registry.toolmesh-system.svc:7401")
SERVER = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
          "metadata": {"name": "calc", "namespace": "team-a", "uid": "u-1", "generation": 1, "labels": {"app": "calc"}},
          "spec": {"image": "example.org/calc:1", "transport": "streamable-http", "port": 8080}}


def hmac_policy(name: str = "jwt-signing", key: str = "hmac") -> PolicySource:
    return PolicySource.from_body({"metadata": {"name": "auth"}, "spec": {"auth": {"issuers": [
        {"issuer": "internal-ci", "audiences": ["toolmesh"], "algorithms": ["HS256"],
         "secretRef": {"name": name, "key": key}}]}}})


def by_kind(manifests: list[dict], kind: str) -> dict:
    [found] = [m for m in manifests if m["kind"] == kind]
    return found


def rendered_policy(manifests: list[dict]) -> dict:
    return yaml.safe_load(by_kind(manifests, "ConfigMap")["data"]["policy.yaml"])


def test_secret_ref_is_mounted_into_the_sidecar_only_and_becomes_its_secret_file():
    secrets = {"jwt-signing": {"hmac", "unrelated"}}
    rendered = render_server(SERVER, [hmac_policy()], CONFIG, secret_keys=secrets.get)
    [issuer] = rendered_policy(rendered.manifests)["spec"]["auth"]["issuers"]
    assert "secretRef" not in issuer
    assert issuer["secretFile"] == f"{POLICY_SECRETS_DIR}/jwt-signing/hmac"
    assert not issuer["secretFile"].startswith(TOKEN_DIR + "/"), "never the registry token's folder"

    pod = by_kind(rendered.manifests, "Deployment")["spec"]["template"]["spec"]
    volumes = [v for v in pod["volumes"] if "secret" in v]
    assert volumes == [{"name": "toolmesh-secret-jwt-signing",
                        "secret": {"secretName": "jwt-signing", "items": [{"key": "hmac", "path": "hmac"}]}}]
    [sidecar] = [c for c in pod["initContainers"] if c["name"] == SIDECAR_NAME]
    assert {"name": "toolmesh-secret-jwt-signing", "mountPath": f"{POLICY_SECRETS_DIR}/jwt-signing",
            "readOnly": True} in sidecar["volumeMounts"]
    server = pod["containers"][0]
    assert all(m["name"] != "toolmesh-secret-jwt-signing" for m in server.get("volumeMounts") or []), \
        "the MCP server never sees the policy's secrets"


def test_a_missing_secret_or_key_is_a_typed_error_naming_both():
    with pytest.raises(MissingSecret) as missing:
        render_server(SERVER, [hmac_policy()], CONFIG, secret_keys={}.get)
    assert (missing.value.name, missing.value.key, missing.value.secret_exists) == ("jwt-signing", "hmac", False)
    assert "spec.auth.issuers[0].secretRef" in str(missing.value) and "team-a/jwt-signing" in str(missing.value)
    with pytest.raises(MissingSecret, match="has no key 'hmac'") as no_key:
        render_server(SERVER, [hmac_policy()], CONFIG, secret_keys={"jwt-signing": {"other"}}.get)
    assert no_key.value.secret_exists
    assert isinstance(no_key.value, ValueError), "reported like a bad spec by a reconciler that knows no better"


def test_secret_keys_of_reads_data_and_string_data():
    assert secret_keys_of(None) is None
    assert secret_keys_of({"data": {"a": "eA=="}, "stringData": {"b": "y"}}) == {"a", "b"}
    assert secret_keys_of({"metadata": {}}) == set()


def test_long_or_dotted_secret_names_get_a_valid_volume_name():
    name = "a.very-long-secret-name.example.org-" + "x" * 40
    rendered = render_server(SERVER, [hmac_policy(name)], CONFIG, secret_keys={name: {"hmac"}}.get)
    pod = by_kind(rendered.manifests, "Deployment")["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    assert len(volume["name"]) <= 63 and "." not in volume["name"]
    assert rendered_policy(rendered.manifests)["spec"]["auth"]["issuers"][0]["secretFile"] == \
        f"{POLICY_SECRETS_DIR}/{name}/hmac"


def test_a_sidecar_given_a_secret_ref_itself_says_only_the_operator_can_mount_it():
    policy = PolicyFile.parse(hmac_policy().spec)
    with pytest.raises(PolicyError, match="only the operator can mount"):
        authenticate.build(policy, SharedState("s"))


def kubelet_secret_volume(root: Path, files: dict[str, str]) -> Path:
    """A Secret volume laid out as the kubelet writes it: files in a timestamped folder behind `..data`, and each
    key a symlink through `..data` (so an update swaps one link)."""
    root.mkdir(parents=True)
    stamped = root / "..2026_01_01_00_00_00.000000001"
    stamped.mkdir()
    for key, value in files.items():
        (stamped / key).write_text(value)
    os.symlink(stamped.name, root / "..data")
    for key in files:
        os.symlink(f"..data/{key}", root / key)
    return root


async def test_the_sidecar_verifies_tokens_with_the_mounted_secret(tmp_path):
    signer = TokenIssuer(issuer="internal-ci", audience="toolmesh")
    rendered = render_server(SERVER, [hmac_policy()], CONFIG, secret_keys={"jwt-signing": {"hmac"}}.get)
    text = by_kind(rendered.manifests, "ConfigMap")["data"]["policy.yaml"]
    # The pod's filesystem, under tmp_path: the Secret volume where the Deployment mounts it, with the value as
    # `kubectl create secret --from-file` stores a file (its trailing newline kept).
    mounted = kubelet_secret_volume(tmp_path / POLICY_SECRETS_DIR.lstrip("/") / "jwt-signing",
                                    {"hmac": signer.secret + "\n"})
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(text.replace(f"{POLICY_SECRETS_DIR}/", f"{tmp_path}{POLICY_SECRETS_DIR}/"))
    policy = PolicyFile.load(policy_file)
    assert policy.auth.issuers[0].secretFile == str(mounted / "hmac")

    stage = authenticate.build(policy, SharedState("s"))

    async def call(token: str) -> Outcome:
        headers = CIMultiDict({"Host": "127.0.0.1:7400", "Authorization": f"Bearer {token}"})
        ctx = CallContext(method="tools/call", request_id=1, params={"name": "echo", "arguments": {}}, raw=b"",
                          headers=headers)

        async def terminal(c: CallContext) -> Outcome:
            return Outcome(message={"jsonrpc": "2.0", "id": c.request_id, "result": {"content": []}})

        return await run_chain(lambda c: stage(c, terminal), ctx)

    assert (await call(signer.token("ci-bot", alg="HS256"))).status == 200
    assert (await call(TokenIssuer(issuer="internal-ci", audience="toolmesh").token("ci-bot", alg="HS256"))).status == 401
