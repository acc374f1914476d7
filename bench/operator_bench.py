"""Operator benchmark on the test control plane: webhook admission latency and the time to reconcile 200 MCPServers.

    .venv/bin/python bench/operator_bench.py [--pods 500] [--servers 200]

Writes bench/results/operator.json. Admission latency is measured three ways: the webhook's own round trip
(an AdmissionReview POSTed over one kept-alive TLS connection, as the apiserver does), pod creation through
the apiserver with and without injection (the difference is what a user pays), and the apiserver's own
histogram of the webhook call.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers.kube import start_control_plane  # noqa: E402
from helpers.operator_proc import create_servers, get_json, install_crds, operator_running  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "operator.json"
OPERATOR_NAMESPACE = "toolmesh-bench"


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"n": len(ordered), "p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99),
            "max_ms": round(ordered[-1], 3), "mean_ms": round(statistics.fmean(ordered), 3)}


def pod(name: str, namespace: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels,
                         "annotations": {"toolmesh.io/upstream-port": "3000"}},
            "spec": {"containers": [{"name": "server", "image": "example.org/mcp:1"}]}}


def direct_reviews(cluster, port: int, count: int) -> dict:
    """The webhook's round trip for `count` AdmissionReviews on one TLS connection."""
    secret = get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", OPERATOR_NAMESPACE)
    context = ssl.create_default_context(cadata=base64.b64decode(secret["data"]["ca.crt"]).decode())
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    samples = []
    for i in range(count + 20):
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"}, "operation": "CREATE",
            "namespace": "bench", "userInfo": {"username": "bench"},
            "object": pod(f"direct-{i}", "bench", {"toolmesh.io/inject": "true"})}}
        body = json.dumps(review)
        started = time.perf_counter()
        conn.request("POST", "/inject-pods", body=body, headers={"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
        elapsed = (time.perf_counter() - started) * 1000
        assert answer["response"]["allowed"] and answer["response"].get("patch"), answer
        if i >= 20:  # the first few warm up the handler path
            samples.append(elapsed)
    conn.close()
    return percentiles(samples)


def pod_creations(cluster, namespace: str, labels: dict, count: int) -> dict:
    """Pod CREATE through the apiserver, one at a time, on one client."""
    from kubernetes import client

    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        samples = []
        for i in range(count):
            body = pod(f"p-{i:04d}", namespace, labels)
            started = time.perf_counter()
            created = core.create_namespaced_pod(namespace, body)
            samples.append((time.perf_counter() - started) * 1000)
            if labels and i == 0:
                assert any(c.name == "toolmesh-sidecar" for c in created.spec.init_containers or [])
    return percentiles(samples)


def apiserver_histogram(cluster) -> dict:
    """The apiserver's own view of our webhook: calls and the share answered within each bucket."""
    text = cluster.kubectl("get", "--raw", "/metrics", timeout=60).stdout
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if (line.startswith("apiserver_admission_webhook_admission_duration_seconds_bucket")
                and 'name="pods.inject.toolmesh.io"' in line):
            le = line.split('le="')[1].split('"')[0]
            buckets[le] = buckets.get(le, 0) + float(line.rsplit(" ", 1)[1])
    total = buckets.get("+Inf", 0)
    return {"calls": int(total), "share_within_s": {le: round(v / total, 4) for le, v in buckets.items() if total}}


def reconcile_servers(cluster, namespace: str, count: int) -> dict:
    docs = [{"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
             "metadata": {"name": f"server-{i:03d}"}, "spec": {"image": "example.org/mcp:1"}} for i in range(count)]
    started = time.monotonic()
    create_servers(cluster, namespace, docs)
    applied = time.monotonic() - started
    deadline = started + 300
    done = 0
    while time.monotonic() < deadline:
        servers = json.loads(cluster.kubectl("get", "mcpservers", "-n", namespace, "-o", "json").stdout)["items"]
        done = 0
        for s in servers:
            conds = {c["type"]: c["status"] for c in (s.get("status") or {}).get("conditions") or []}
            if conds.get("PolicyApplied") == "True" and conds.get("Ready") in ("True", "False"):
                done += 1
        if done == count:
            break
        time.sleep(0.5)
    total = time.monotonic() - started
    ready = sum(1 for s in servers if any(c["type"] == "Ready" and c["status"] == "True"
                                          for c in (s.get("status") or {}).get("conditions") or []))
    return {"servers": count, "reconciled": done, "create_s": round(applied, 2),
            "all_reconciled_s": round(total, 2), "ready_true_at_end": ready}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=500)
    parser.add_argument("--servers", type=int, default=200)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="toolmesh-operator-bench-"))
    cluster = start_control_plane(workdir / "cluster")
    try:
        install_crds(cluster)
        result: dict = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
                        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with operator_running(cluster, workdir / "operator.log", namespace=OPERATOR_NAMESPACE) as op:
            for ns in ("bench-injected", "bench-plain", "bench-servers"):
                cluster.kubectl("create", "namespace", ns)
                cluster.wait_for(lambda: cluster.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0,
                                 timeout=30, what="the default ServiceAccount")
            result["webhook_direct"] = direct_reviews(cluster, op.webhook_port, args.pods)
            result["pod_create_injected"] = pod_creations(cluster, "bench-injected", {"toolmesh.io/inject": "true"},
                                                          args.pods)
            result["pod_create_plain"] = pod_creations(cluster, "bench-plain", {}, args.pods)
            result["pod_create_added_p50_ms"] = round(
                result["pod_create_injected"]["p50_ms"] - result["pod_create_plain"]["p50_ms"], 3)
            result["apiserver_webhook_histogram"] = apiserver_histogram(cluster)
            result["reconcile"] = reconcile_servers(cluster, "bench-servers", args.servers)
        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result["targets"] = {"webhook_p99_ms": 20, "reconcile_200_s": 60}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
