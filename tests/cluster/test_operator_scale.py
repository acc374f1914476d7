"""Two hundred MCPServers applied at once all get their workloads and status well within a minute."""

from __future__ import annotations

import json
import time

import pytest
from helpers import wait_until
from helpers.operator_proc import create_servers, install_crds, operator_running

pytestmark = pytest.mark.cluster

COUNT = 200


def reconciled(cluster, namespace: str) -> int:
    """How many MCPServers have a Deployment and a status written for their current generation."""
    servers = json.loads(cluster.kubectl("get", "mcpservers", "-n", namespace, "-o", "json").stdout)["items"]
    deployments = {d["metadata"]["name"] for d in json.loads(
        cluster.kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout)["items"]}
    done = 0
    for s in servers:
        status = s.get("status") or {}
        conds = {c["type"]: c for c in status.get("conditions") or []}
        if (s["metadata"]["name"] in deployments and status.get("observedGeneration") == s["metadata"]["generation"]
                and conds.get("PolicyApplied", {}).get("status") == "True" and "Ready" in conds):
            done += 1
    return done


def test_two_hundred_servers_reconcile(cluster, namespace, tmp_path):
    install_crds(cluster)
    docs = [{"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
             "metadata": {"name": f"server-{i:03d}", "labels": {"shard": str(i % 4)}},
             "spec": {"image": "example.org/mcp:1", "port": 8000 + i % 100}} for i in range(COUNT)]
    with operator_running(cluster, tmp_path / "operator.log", webhook=False):
        started = time.monotonic()
        create_servers(cluster, namespace, docs)
        wait_until(lambda: reconciled(cluster, namespace) == COUNT, timeout=180, interval=1.0,
                   what=f"{COUNT} MCPServers reconciled")
        elapsed = time.monotonic() - started
    print(f"{COUNT} MCPServers reconciled in {elapsed:.1f} s")
