"""The cluster fixture is a working control plane: it runs Deployments, reports its version, reviews tokens, and helm works."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import ROOT
from helpers.kube import cluster_bin_dir

pytestmark = pytest.mark.cluster

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: example.invalid/web:1
"""


def test_deployment_pods_run_on_the_fake_node(cluster, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=DEPLOYMENT)

    def running_pods():
        pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "app=web")["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return running if len(running) == 2 else None

    pods = cluster.wait_for(running_pods, timeout=30, what="2 Running pods of the Deployment")
    assert {p["spec"]["nodeName"] for p in pods} == {cluster.node}
    owners = {p["metadata"]["ownerReferences"][0]["kind"] for p in pods}
    assert owners == {"ReplicaSet"}
    deployment = cluster.wait_for(
        lambda: (d := cluster.kubectl_json("get", "deployment", "web", "-n", namespace))["status"].get("readyReplicas") == 2 and d,
        timeout=30, what="the Deployment to report 2 ready replicas")
    assert deployment["status"]["availableReplicas"] == 2


def test_kubectl_version_matches_client_and_server(cluster):
    versions = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert versions["clientVersion"]["gitVersion"] == "v1.36.3"
    assert versions["serverVersion"]["gitVersion"] == "v1.36.3"


def test_service_account_token_passes_token_review(cluster, namespace):
    token = cluster.token_for(namespace, "registry-client", "toolmesh-registry")
    review = {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": token, "audiences": ["toolmesh-registry"]},
    }
    status = json.loads(cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review)).stdout)["status"]
    assert status["authenticated"] is True
    assert status["user"]["username"] == f"system:serviceaccount:{namespace}:registry-client"
    assert status["audiences"] == ["toolmesh-registry"]

    # The same token presented for another audience is refused.
    review["spec"]["audiences"] = ["someone-else"]
    status = json.loads(cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review)).stdout)["status"]
    assert not status.get("authenticated")


def test_api_client_talks_to_the_cluster(cluster, namespace):
    from kubernetes import client

    with cluster.api_client() as api:
        names = {ns.metadata.name for ns in client.CoreV1Api(api).list_namespace().items}
    assert namespace in names


def test_helm_version(cluster):
    out = cluster.helm("version", "--short").stdout.strip()
    assert out.startswith("v3.21.4"), out


def test_fake_node_lease_is_renewed(cluster):
    """Without a renewed Lease the node lifecycle controller marks the Node NotReady after its grace period."""
    def renew_time():
        return cluster.kubectl_json("get", "lease", cluster.node, "-n", "kube-node-lease")["spec"]["renewTime"]

    first = cluster.wait_for(renew_time, timeout=10, what=f"the Lease of Node {cluster.node}")
    cluster.wait_for(lambda: renew_time() != first, timeout=30, what="the Node Lease to be renewed")
    assert cluster.wait_for(cluster.node_ready, timeout=5, what="the Node to stay Ready")


def test_build_script_and_fixture_agree_on_the_bin_dir():
    bin_dir = cluster_bin_dir()  # fails at once if nothing is built, instead of building inside a test
    out = subprocess.run(["bash", str(ROOT / "tests" / "cluster" / "build.sh")], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip().splitlines()[-1] == str(bin_dir)
    assert "already built" in out and "building" not in out
