"""The operator on a real control plane: examples become workloads, status and printer columns tell the story,
policies re-render ConfigMaps, deletion cleans up, a restart converges, and the apiserver rejects bad manifests."""

from __future__ import annotations

import pytest
import yaml

from helpers import ROOT
from helpers.operator_proc import condition, get_json, install_crds, operator_running

pytestmark = pytest.mark.cluster

EXAMPLES = sorted((ROOT / "examples" / "servers").glob("*.yaml"))


@pytest.fixture(scope="module")
def operator(cluster, tmp_path_factory):
    install_crds(cluster)
    with operator_running(cluster, tmp_path_factory.mktemp("operator") / "operator.log", webhook=False) as op:
        yield op


def server_manifest(name: str, labels: dict | None = None, **spec) -> str:
    spec = {"image": "example.org/mcp:1", **spec}
    return yaml.safe_dump({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
                           "metadata": {"name": name, "labels": labels or {}}, "spec": spec})


def policy_manifest(name: str, **spec) -> str:
    return yaml.safe_dump({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy",
                           "metadata": {"name": name}, "spec": spec})


def policy_file(cluster, namespace: str, server: str) -> dict | None:
    cm = get_json(cluster, "configmap", f"{server}-policy", "-n", namespace)
    return yaml.safe_load(cm["data"]["policy.yaml"]) if cm else None


def parse_table(text: str) -> list[dict[str, str]]:
    """kubectl's table output as rows keyed by header; columns are cut where the header's words start."""
    lines = text.splitlines()
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    bounds = list(zip(starts, starts[1:] + [None]))
    names = [header[a:b].strip() for a, b in bounds]
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, bounds)} for line in lines[1:]]


def ttl(doc: dict) -> float | None:
    """The cache TTL in a rendered policy file (the apiserver fills in the section's other defaults)."""
    return (doc["spec"].get("cache") or {}).get("ttlSeconds")


def wait_policy(cluster, namespace, server, predicate, what, timeout=30):
    return cluster.wait_for(lambda: (doc := policy_file(cluster, namespace, server)) is not None and predicate(doc)
                            and doc, timeout=timeout, what=what)


def test_every_example_becomes_a_working_picture(cluster, namespace, operator):
    for path in EXAMPLES:
        cluster.kubectl("apply", "-n", namespace, "-f", str(path))
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in EXAMPLES]
    assert len(names) >= 3

    def ready(name):
        server = get_json(cluster, "mcpserver", name, "-n", namespace)
        cond = condition(server, "Ready")
        return cond and cond["status"] == "True" and server

    for name in names:
        server = cluster.wait_for(lambda: ready(name), timeout=60, what=f"MCPServer {name} Ready=True")
        uid = server["metadata"]["uid"]
        assert server["status"]["endpoint"] == f"http://{name}.{namespace}.svc:7400/mcp"
        assert condition(server, "PolicyApplied")["status"] == "True"
        assert condition(server, "Healthy")["status"] == "Unknown", "Healthy is the registry's to set"
        assert condition(server, "Ready")["observedGeneration"] == server["metadata"]["generation"]
        for kind in ("serviceaccount", "deployment", "service"):
            child = get_json(cluster, kind, name, "-n", namespace)
            assert child["metadata"]["ownerReferences"][0]["uid"] == uid, kind
        service = get_json(cluster, "service", name, "-n", namespace)
        assert [p["targetPort"] for p in service["spec"]["ports"]] == [7400], "the Service targets the sidecar"
        deployment = get_json(cluster, "deployment", name, "-n", namespace)
        pod = deployment["spec"]["template"]["spec"]
        assert pod["initContainers"][0]["name"] == "toolmesh-sidecar"
        assert pod["initContainers"][0]["restartPolicy"] == "Always"
        assert policy_file(cluster, namespace, name)["kind"] == "MCPToolPolicy"
    # The stdio example's server container runs its command on the FIFOs.
    stdio = get_json(cluster, "deployment", "time", "-n", namespace)["spec"]["template"]["spec"]
    assert stdio["containers"][0]["command"][:2] == ["/bin/sh", "-c"]
    assert "--upstream-fifo-dir" in stdio["initContainers"][0]["args"]
    # The SSE example's inline policy is in its ConfigMap.
    assert policy_file(cluster, namespace, "everything-sse")["spec"]["cache"]["ttlSeconds"] == 60

    table = cluster.kubectl("get", "mcpservers", "-n", namespace).stdout
    assert table.splitlines()[0].split() == ["NAME", "READY", "TOOLS", "HEALTHY", "ENDPOINT", "AGE"]
    rows = {row["NAME"]: row for row in parse_table(table)}
    assert set(rows) == set(names)
    assert rows["time"]["READY"] == "True" and rows["time"]["TOOLS"] == "", "no tools until the registry reports"
    assert rows["time"]["ENDPOINT"] == f"http://time.{namespace}.svc:7400/mcp"
    short = cluster.kubectl("get", "mcps", "-n", namespace, "-o", "wide").stdout.splitlines()[0].split()
    assert "TRANSPORT" in short
    # The README's troubleshooting command: each condition with its reason and message.
    described = cluster.kubectl("describe", "mcpserver", "time", "-n", namespace).stdout
    for line in ("Type:", "Reason:", "Message:"):
        assert line in described, described
    assert "PolicyApplied" in described and "Ready" in described, described


def test_example_policies_are_accepted_and_reported(cluster, namespace, operator):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("target"))
    paths = [*sorted((ROOT / "examples" / "policies").glob("*.yaml")),
             *sorted((ROOT / "examples" / "cluster").glob("*.yaml"))]
    # The Secret auth-hmac-secret.yaml names, made as its comment says.
    cluster.kubectl("create", "secret", "generic", "jwt-signing", "-n", namespace, "--from-literal=hmac=0123456789abcdef")
    for path in paths:
        cluster.kubectl("apply", "-n", namespace, "-f", str(path))
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in paths]
    for name in names:
        policy = cluster.wait_for(
            lambda: (p := get_json(cluster, "mcptoolpolicy", name, "-n", namespace))
            and (p.get("status") or {}).get("servers") == ["target"] and p,
            timeout=30, what=f"policy {name} to list its server")
        assert condition(policy, "Accepted")["status"] == "True", condition(policy, "Accepted")
    server = cluster.wait_for(
        lambda: (s := get_json(cluster, "mcpserver", "target", "-n", namespace))
        and set(names) <= set((s.get("status") or {}).get("appliedPolicies") or []) and s,
        timeout=30, what="every example policy applied to the server")
    assert condition(server, "PolicyApplied")["status"] == "True", condition(server, "PolicyApplied")
    table = cluster.kubectl("get", "mcptp", "-n", namespace).stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "SERVERS", "PRECEDENCE"]


def test_policy_create_update_delete_rerender_configmaps(cluster, namespace, operator):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("search", {"team": "research"}))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("other", {"team": "ops"}))
    wait_policy(cluster, namespace, "search", lambda d: d["spec"] == {}, "the first, empty policy")

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=policy_manifest(
        "research-cache", selector={"matchLabels": {"team": "research"}}, cache={"ttlSeconds": 30}))
    wait_policy(cluster, namespace, "search", lambda d: ttl(d) == 30,
                "the new policy in the ConfigMap")
    assert "cache" not in policy_file(cluster, namespace, "other")["spec"], "a policy applies only where it selects"
    policy = cluster.wait_for(lambda: (p := get_json(cluster, "mcptoolpolicy", "research-cache", "-n", namespace))
                              and (p.get("status") or {}).get("servers") == ["search"] and p,
                              timeout=30, what="the policy's status to list its server")
    assert policy["status"]["serverCount"] == 1

    # A higher-precedence policy selecting everything wins the cache section.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=policy_manifest(
        "everyone", precedence=10, cache={"ttlSeconds": 5}))
    wait_policy(cluster, namespace, "search", lambda d: ttl(d) == 5,
                "precedence to decide the cache section")
    wait_policy(cluster, namespace, "other", lambda d: ttl(d) == 5,
                "the cluster-wide policy on the other server")

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=policy_manifest(
        "everyone", precedence=10, cache={"ttlSeconds": 7}))
    wait_policy(cluster, namespace, "other", lambda d: ttl(d) == 7,
                "the updated policy")

    cluster.kubectl("delete", "mcptoolpolicy", "everyone", "-n", namespace)
    wait_policy(cluster, namespace, "search", lambda d: ttl(d) == 30,
                "the remaining policy after the deletion")
    wait_policy(cluster, namespace, "other", lambda d: "cache" not in d["spec"], "no cache left on the other server")
    server = get_json(cluster, "mcpserver", "search", "-n", namespace)
    assert server["status"]["appliedPolicies"] == ["research-cache"]


def test_policy_the_model_rejects_is_reported_and_the_operator_carries_on(cluster, namespace, operator):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("svc"))
    # The schema accepts this (each field is in range); the model's cross-field rule does not.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=policy_manifest(
        "too-small", budget={"totalTokens": 1000, "reservedForResponse": 900, "reservedForSystem": 900}))
    policy = cluster.wait_for(
        lambda: (p := get_json(cluster, "mcptoolpolicy", "too-small", "-n", namespace))
        and (c := condition(p, "Accepted")) and c["status"] == "False" and p, timeout=30,
        what="the invalid policy to be reported")
    assert "spec.budget" in condition(policy, "Accepted")["message"]
    assert policy["status"]["servers"] == []
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=policy_manifest("fine", retry={"maxAttempts": 2}))
    wait_policy(cluster, namespace, "svc", lambda d: list(d["spec"]) == ["retry"] and d["spec"]["retry"]["maxAttempts"] == 2,
                "a valid policy next to the invalid one")
    assert operator.proc.poll() is None


def test_update_patches_only_what_changed(cluster, namespace, operator):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("scale"))
    cluster.wait_for(lambda: get_json(cluster, "service", "scale", "-n", namespace), what="the Service")
    cluster.wait_for(lambda: policy_file(cluster, namespace, "scale"), what="the ConfigMap")
    before = {kind: get_json(cluster, kind, name, "-n", namespace)["metadata"]["resourceVersion"]
              for kind, name in (("service", "scale"), ("configmap", "scale-policy"), ("serviceaccount", "scale"))}
    cluster.kubectl("patch", "mcpserver", "scale", "-n", namespace, "--type=merge", "-p",
                    '{"spec": {"replicas": 3}}')
    cluster.wait_for(lambda: get_json(cluster, "deployment", "scale", "-n", namespace)["spec"]["replicas"] == 3,
                     what="the Deployment to follow the new replica count")
    server = cluster.wait_for(lambda: (s := get_json(cluster, "mcpserver", "scale", "-n", namespace))
                              and s["status"].get("observedGeneration") == s["metadata"]["generation"] and s,
                              what="status to observe the new generation")
    assert server["metadata"]["generation"] >= 2
    after = {kind: get_json(cluster, kind, name, "-n", namespace)["metadata"]["resourceVersion"]
             for kind, name in (("service", "scale"), ("configmap", "scale-policy"), ("serviceaccount", "scale"))}
    assert after == before, "unchanged children were left alone"


def test_deleting_a_server_removes_its_children(cluster, namespace, operator):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("gone"))
    cluster.wait_for(lambda: get_json(cluster, "deployment", "gone", "-n", namespace), what="the Deployment")
    cluster.wait_for(lambda: policy_file(cluster, namespace, "gone"), what="the ConfigMap")
    cluster.kubectl("delete", "mcpserver", "gone", "-n", namespace, "--wait=true", timeout=60)

    def all_gone():
        return all(get_json(cluster, kind, name, "-n", namespace) is None for kind, name in (
            ("deployment", "gone"), ("service", "gone"), ("serviceaccount", "gone"), ("configmap", "gone-policy")))

    cluster.wait_for(all_gone, timeout=60, what="the garbage collector to delete every child")


def test_invalid_manifests_are_rejected_naming_the_field(cluster, namespace, operator):
    cases = [
        (server_manifest("p", port=70000), "spec.port"),
        (server_manifest("t", transport="carrier-pigeon"), "spec.transport"),
        (server_manifest("s", transport="stdio", image="x"), "spec.command"),
        (yaml.safe_dump({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": "no-image"},
                         "spec": {"args": ["x"]}}), "spec.image"),
        (server_manifest("u", imagePullSecret="x"), "imagePullSecret"),
        (policy_manifest("two-keys", auth={"issuers": [{"issuer": "i", "audiences": ["a"], "secret": "s",
                                                         "jwksUrl": "https://i/jwks"}]}), "exactly one of"),
        (policy_manifest("bad-retry", retry={"strategy": "sometimes"}), "spec.retry.strategy"),
        (policy_manifest("authz-alone", authorization={"defaultScopes": ["x"]}), "spec.authorization"),
    ]
    for manifest, needle in cases:
        result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=False)
        assert result.returncode != 0, f"accepted: {manifest}"
        assert needle in result.stderr, result.stderr


def test_a_deleted_child_is_restored(cluster, namespace, operator):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("keep"))
    first = cluster.wait_for(lambda: get_json(cluster, "service", "keep", "-n", namespace), what="the Service")
    cluster.kubectl("delete", "service", "keep", "-n", namespace)
    again = cluster.wait_for(lambda: (s := get_json(cluster, "service", "keep", "-n", namespace))
                             and s["metadata"]["uid"] != first["metadata"]["uid"] and s, timeout=30,
                             what="the operator to recreate the deleted Service")
    assert again["spec"]["ports"][0]["port"] == 7400
