"""An operator stopped mid-way and started again converges on what changed while it was down."""

from __future__ import annotations

import pytest
import yaml

from helpers.operator_proc import get_json, install_crds, operator_running

pytestmark = pytest.mark.cluster


def server_manifest(name: str, **spec) -> str:
    return yaml.safe_dump({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": name},
                           "spec": {"image": "example.org/mcp:1", **spec}})


def policy_text(cluster, namespace, server):
    cm = get_json(cluster, "configmap", f"{server}-policy", "-n", namespace)
    return yaml.safe_load(cm["data"]["policy.yaml"]) if cm else None


def test_operator_restart_converges(cluster, namespace, tmp_path):
    install_crds(cluster)
    with operator_running(cluster, tmp_path / "first.log", webhook=False):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("steady"))
        cluster.wait_for(lambda: get_json(cluster, "deployment", "steady", "-n", namespace), timeout=60,
                         what="the first operator to create the Deployment")
    # Down: a new server, a changed server, a new policy, a deleted server child.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("while-down"))
    cluster.kubectl("patch", "mcpserver", "steady", "-n", namespace, "--type=merge", "-p", '{"spec": {"replicas": 2}}')
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump({
        "apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": "late"},
        "spec": {"cache": {"ttlSeconds": 9}}}))
    cluster.kubectl("delete", "service", "steady", "-n", namespace)
    with operator_running(cluster, tmp_path / "second.log", webhook=False):
        cluster.wait_for(lambda: get_json(cluster, "deployment", "while-down", "-n", namespace), timeout=60,
                         what="the server created while the operator was down")
        cluster.wait_for(lambda: get_json(cluster, "deployment", "steady", "-n", namespace)["spec"]["replicas"] == 2,
                         timeout=60, what="the change made while the operator was down")
        cluster.wait_for(lambda: get_json(cluster, "service", "steady", "-n", namespace), timeout=60,
                         what="the deleted Service to be recreated")
        for name in ("steady", "while-down"):
            cluster.wait_for(lambda: ((policy_text(cluster, namespace, name) or {}).get("spec") or {}).get("cache", {})
                             .get("ttlSeconds") == 9, timeout=60, what=f"the late policy on {name}")
