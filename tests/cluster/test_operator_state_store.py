"""The shared store reaches every sidecar the operator renders, its password only by reference, and a missing
password Secret is said in the status before any pod could fail on it."""

from __future__ import annotations

import json

import pytest

from helpers.operator_proc import condition, get_json, install_crds, operator_running

pytestmark = pytest.mark.cluster

URL = "rediss://redis.infra.svc:6380/0"


@pytest.fixture(scope="module")
def operator(cluster, tmp_path_factory):
    install_crds(cluster)
    with operator_running(cluster, tmp_path_factory.mktemp("operator") / "operator.log", webhook=False,
                          namespace="toolmesh-state-test",
                          extra=("--state-redis-url", URL, "--state-redis-secret", "redis-auth:pw")) as op:
        yield op


def test_sidecars_get_the_store_and_a_missing_password_secret_is_reported(cluster, namespace, operator):
    server = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": "calc"},
              "spec": {"image": "example.org/calc:1"}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(server))

    def status_says(expected: str):
        def check():
            body = get_json(cluster, "mcpserver", "calc", "-n", namespace)
            applied = condition(body, "PolicyApplied")
            return applied and applied["status"] == expected and applied
        try:
            return cluster.wait_for(check, timeout=60, what=f"PolicyApplied={expected}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\noperator log:\n{operator.log()[-3000:]}") from None

    missing = status_says("False")
    assert "redis-auth" in missing["message"] and "state.redis.existingSecret" in missing["message"], missing
    assert get_json(cluster, "deployment", "calc", "-n", namespace) is None, "no pod that could not start"

    cluster.kubectl("create", "secret", "generic", "redis-auth", "-n", namespace, "--from-literal=pw=hunter2")
    cluster.kubectl("patch", "mcpserver", "calc", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":2}}')
    status_says("True")
    pod = get_json(cluster, "deployment", "calc", "-n", namespace)["spec"]["template"]["spec"]
    [sidecar] = [c for c in pod["initContainers"] if c["name"] == "toolmesh-sidecar"]
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["TOOLMESH_STATE_REDIS_URL"]["value"] == URL
    assert env["TOOLMESH_STATE_REDIS_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "redis-auth", "key": "pw"}}
    assert "hunter2" not in json.dumps(pod)
