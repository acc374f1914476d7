"""A policy's `secretRef` on the real control plane: the Secret reaches the sidecar, and a missing one is reported.

Pods do not run on the kwok node, so what is checked is what the kubelet would get: the Deployment's pod template
mounts that Secret's key into the sidecar, and the policy in the ConfigMap names that file as `secretFile`. (That
the sidecar reads such a file is tests/unit/test_policy_secrets.py.)
"""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import ROOT
from helpers.operator_proc import condition, get_json, install_crds, operator_running

pytestmark = pytest.mark.cluster

EXAMPLE = ROOT / "examples" / "policies" / "auth-hmac-secret.yaml"


@pytest.fixture(scope="module")
def operator(cluster, tmp_path_factory):
    install_crds(cluster)
    with operator_running(cluster, tmp_path_factory.mktemp("operator") / "operator.log", webhook=False,
                          namespace="toolmesh-secrets-test") as op:
        yield op


def server_manifest(name: str) -> str:
    return json.dumps({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": name},
                       "spec": {"image": "example.org/calc:1", "transport": "streamable-http", "port": 8080}})


def policy_applied(cluster, namespace: str, name: str, status: str, operator):
    def check():
        body = get_json(cluster, "mcpserver", name, "-n", namespace)
        applied = condition(body, "PolicyApplied")
        fresh = body and (body.get("status") or {}).get("observedGeneration") == body["metadata"]["generation"]
        return fresh and applied and applied["status"] == status and applied

    try:
        return cluster.wait_for(check, timeout=60, what=f"PolicyApplied={status} on {name}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{operator.log()[-3000:]}") from None


def test_the_examples_secret_is_mounted_into_the_sidecar_and_read_from_there(cluster, namespace, operator):
    cluster.kubectl("create", "secret", "generic", "jwt-signing", "-n", namespace, "--from-literal=hmac=s3cr3t",
                    "--from-literal=unrelated=x")
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("calc"))
    policy_applied(cluster, namespace, "calc", "True", operator)

    configmap = get_json(cluster, "configmap", "calc-policy", "-n", namespace)
    [issuer] = yaml.safe_load(configmap["data"]["policy.yaml"])["spec"]["auth"]["issuers"]
    assert "secretRef" not in issuer

    pod = get_json(cluster, "deployment", "calc", "-n", namespace)["spec"]["template"]["spec"]
    [sidecar] = [c for c in pod["initContainers"] if c["name"] == "toolmesh-sidecar"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [mount] = [m for m in sidecar["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert volumes[mount["name"]]["secret"] == {"secretName": "jwt-signing", "defaultMode": 420,
                                                "items": [{"key": "hmac", "path": "hmac"}]}
    assert mount["readOnly"] is True
    # The file the sidecar reads is the mounted key, outside the folder holding its registry token.
    assert issuer["secretFile"] == f"{mount['mountPath']}/hmac"
    token_mounts = [m["mountPath"] for m in sidecar["volumeMounts"] if "projected" in volumes[m["name"]]]
    assert not any(issuer["secretFile"].startswith(p.rstrip("/") + "/") for p in token_mounts)
    # The MCP server container never gets the policy's secrets.
    assert all(m["name"] != mount["name"] for c in pod["containers"] for m in c.get("volumeMounts") or [])


def test_a_missing_secret_or_key_is_reported_and_the_policy_is_not_applied(cluster, namespace, operator):
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("calc"))
    applied = policy_applied(cluster, namespace, "calc", "False", operator)
    assert "jwt-signing" in applied["message"] and "does not exist" in applied["message"], applied
    assert get_json(cluster, "configmap", "calc-policy", "-n", namespace) is None, "no policy the sidecar cannot load"

    # A Secret without the key: still reported, now naming the key.
    cluster.kubectl("create", "secret", "generic", "jwt-signing", "-n", namespace, "--from-literal=other=x")
    cluster.kubectl("patch", "mcpserver", "calc", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":2}}')
    applied = policy_applied(cluster, namespace, "calc", "False", operator)
    assert "no key 'hmac'" in applied["message"], applied

    # With the key in place the policy applies at the next change of the server.
    cluster.kubectl("delete", "secret", "jwt-signing", "-n", namespace)
    cluster.kubectl("create", "secret", "generic", "jwt-signing", "-n", namespace, "--from-literal=hmac=s3cr3t")
    cluster.kubectl("patch", "mcpserver", "calc", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":1}}')
    policy_applied(cluster, namespace, "calc", "True", operator)
    assert get_json(cluster, "configmap", "calc-policy", "-n", namespace) is not None
