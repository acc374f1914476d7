"""The admission webhook on a real apiserver: labelled pods get the sidecar once, other pods are left alone."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers.operator_proc import SIDECAR_IMAGE, WEBHOOK_CONFIGURATION, get_json, install_crds, operator_running

pytestmark = pytest.mark.cluster

OPERATOR_NAMESPACE = "toolmesh-webhook-test"


@pytest.fixture(scope="module")
def operator(cluster, tmp_path_factory):
    install_crds(cluster)
    with operator_running(cluster, tmp_path_factory.mktemp("operator") / "operator.log",
                          namespace=OPERATOR_NAMESPACE) as op:
        cluster.wait_for(lambda: get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION),
                         what="the webhook configuration")
        yield op


def pod_manifest(name: str, labels: dict | None = None, annotations: dict | None = None) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
                           "spec": {"containers": [{"name": "server", "image": "example.org/mcp:1"}]}})


def create_pod(cluster, namespace: str, manifest: str, check: bool = True):
    return cluster.kubectl("create", "-n", namespace, "-f", "-", "-o", "json", input=manifest, check=check)


def sidecars(pod: dict) -> list[dict]:
    return [c for c in pod["spec"].get("initContainers") or [] if c["name"] == "toolmesh-sidecar"]


def test_labelled_pod_gets_the_sidecar_once(cluster, namespace, operator):
    pod = json.loads(create_pod(cluster, namespace, pod_manifest(
        "calc", {"toolmesh.io/inject": "true", "app": "calc"},
        {"toolmesh.io/upstream-port": "3000", "toolmesh.io/policy-configmap": "calc-policy"})).stdout)
    [sidecar] = sidecars(pod)
    assert sidecar["restartPolicy"] == "Always" and sidecar["image"] == SIDECAR_IMAGE
    assert sidecar["args"][sidecar["args"].index("--upstream") + 1] == "http://127.0.0.1:3000/mcp"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["resources"]["limits"]["memory"] == "128Mi"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["toolmesh-policy"]["configMap"]["name"] == "calc-policy"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["server"]

    # A second admission of the injected pod (its spec submitted again) adds nothing.
    again = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "calc-again", "labels": pod["metadata"]["labels"], "annotations": pod["metadata"]["annotations"]},
        "spec": {k: v for k, v in pod["spec"].items() if k not in ("nodeName",)}}
    second = json.loads(create_pod(cluster, namespace, yaml.safe_dump(again)).stdout)
    assert len(sidecars(second)) == 1
    assert second["spec"]["initContainers"] == pod["spec"]["initContainers"]
    assert len(second["spec"]["volumes"]) == len(pod["spec"]["volumes"])
    # Scheduled and reported Running by the fake node, sidecar and all.
    cluster.wait_for(lambda: get_json(cluster, "pod", "calc", "-n", namespace)["status"].get("phase") == "Running",
                     timeout=30, what="the injected pod to run")


def test_unlabelled_pods_are_left_alone(cluster, namespace, operator):
    pod = json.loads(create_pod(cluster, namespace, pod_manifest("plain")).stdout)
    assert not sidecars(pod)


def test_namespace_label_injects_its_pods_and_a_pod_can_opt_out(cluster, namespace, operator):
    cluster.kubectl("label", "namespace", namespace, "toolmesh.io/inject=true")
    try:
        injected = json.loads(create_pod(cluster, namespace, pod_manifest("in-labelled-ns")).stdout)
        assert len(sidecars(injected)) == 1
        opted_out = json.loads(create_pod(cluster, namespace, pod_manifest(
            "opted-out", {"toolmesh.io/inject": "false"})).stdout)
        assert not sidecars(opted_out)
        # Pods made by a Deployment's ReplicaSet go through the same webhook.
        cluster.kubectl("create", "deployment", "web", "--image=example.org/web:1", "-n", namespace)
        pods = cluster.wait_for(lambda: cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "app=web")["items"],
                                timeout=30, what="the Deployment's pod")
        assert len(sidecars(pods[0])) == 1
    finally:
        cluster.kubectl("label", "namespace", namespace, "toolmesh.io/inject-")


def test_operator_and_system_namespaces_are_never_injected(cluster, operator):
    for ns in (OPERATOR_NAMESPACE, "kube-system"):
        name = "must-not-inject"
        pod = json.loads(create_pod(cluster, ns, pod_manifest(name, {"toolmesh.io/inject": "true"})).stdout)
        try:
            assert not sidecars(pod), ns
        finally:
            cluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false", check=False)


def test_bad_annotation_is_refused_with_its_name(cluster, namespace, operator):
    result = create_pod(cluster, namespace, pod_manifest(
        "bad", {"toolmesh.io/inject": "true"}, {"toolmesh.io/upstream-port": "eighty"}), check=False)
    assert result.returncode != 0
    assert "toolmesh.io/upstream-port" in result.stderr


def test_webhook_configuration_is_explicit_and_trusts_the_operator_certificate(cluster, operator):
    config = get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
    for hook in config["webhooks"]:
        assert hook["failurePolicy"] == "Fail"
        assert hook["clientConfig"]["url"] == f"https://127.0.0.1:{operator.webhook_port}/inject-pods"
        excluded = hook["namespaceSelector"]["matchExpressions"][-1]
        assert {"kube-system", OPERATOR_NAMESPACE} <= set(excluded["values"])
    secret = get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", OPERATOR_NAMESPACE)
    assert secret["data"]["ca.crt"] == config["webhooks"][0]["clientConfig"]["caBundle"]
