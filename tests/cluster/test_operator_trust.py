"""The operator a platform team can trust with tenants: a wrong policy edit never loosens a server, an MCPServer never
takes over (or later deletes) an object it did not create, and what a person must act on is an Event."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers.operator_proc import condition, get_json, install_crds, operator_running

pytestmark = pytest.mark.cluster

AUTH = {"issuers": [{"issuer": "https://idp.example", "audiences": ["mcp"], "secret": "s3cret"}]}
TWO_SAME_ISSUERS = {"issuers": [{"issuer": "https://idp.example", "audiences": ["mcp"], "secret": "a"},
                                {"issuer": "https://idp.example", "audiences": ["mcp"], "secret": "b"}]}


@pytest.fixture(scope="module")
def operator(cluster, tmp_path_factory):
    install_crds(cluster)
    with operator_running(cluster, tmp_path_factory.mktemp("operator") / "operator.log", webhook=False) as op:
        yield op


def server_manifest(name: str, labels: dict | None = None) -> str:
    return yaml.safe_dump({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
                           "metadata": {"name": name, "labels": labels or {}},
                           "spec": {"image": "example.org/mcp:1"}})


def policy_manifest(name: str, **spec) -> str:
    return yaml.safe_dump({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy",
                           "metadata": {"name": name}, "spec": spec})


def policy_spec(cluster, namespace: str, server: str) -> dict | None:
    cm = get_json(cluster, "configmap", f"{server}-policy", "-n", namespace)
    return yaml.safe_load(cm["data"]["policy.yaml"])["spec"] if cm else None


def wait_condition(cluster, kind: str, name: str, namespace: str, type_: str, reason: str | tuple[str, ...],
                   timeout: float = 30):
    reasons = (reason,) if isinstance(reason, str) else reason

    def reached():
        obj = get_json(cluster, kind, name, "-n", namespace)
        cond = condition(obj, type_)
        return (cond and cond["reason"] in reasons and cond["observedGeneration"] == obj["metadata"]["generation"]
                and obj)

    return cluster.wait_for(reached, timeout=timeout, what=f"{kind} {name} {type_} reason {reason}")


def events(cluster, namespace: str, kind: str, name: str, reason: str) -> list[dict]:
    items = cluster.kubectl_json("get", "events", "-n", namespace)["items"]
    return [e for e in items if e["involvedObject"].get("kind") == kind and e["involvedObject"].get("name") == name
            and e["reason"] == reason]


def handled(cluster, namespace: str, name: str):
    """The operator has written its status on this MCPServer's current generation (whatever it decided)."""
    return cluster.wait_for(lambda: (s := get_json(cluster, "mcpserver", name, "-n", namespace))
                            and (c := condition(s, "PolicyApplied"))
                            and c["observedGeneration"] == s["metadata"]["generation"] and s,
                            timeout=30, what=f"MCPServer {name} handled")


def reconciled(cluster, namespace: str, name: str):
    """A barrier: a new server, handled after everything queued before it."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest(name))
    return handled(cluster, namespace, name)


# --- 1. an invalid policy edit never switches protection off -------------------------------------------------------

@pytest.mark.parametrize("bad_edit, field", [
    ({"auth": TWO_SAME_ISSUERS}, "spec.auth"),
    ({"auth": AUTH, "timeouts": {"callSeconds": 120, "maxSeconds": 60}}, "spec.timeouts"),
], ids=["duplicate-issuers", "bad-timeouts"])
def test_an_invalid_policy_edit_keeps_the_last_valid_policy(cluster, namespace, operator, bad_edit, field):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("tools"))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=policy_manifest(
        "strict", auth=AUTH, timeouts={"callSeconds": 10, "maxSeconds": 60}))
    cluster.wait_for(lambda: (policy_spec(cluster, namespace, "tools") or {}).get("auth"), timeout=30,
                     what="the auth section in the server's ConfigMap")
    before = policy_spec(cluster, namespace, "tools")
    wait_condition(cluster, "mcptoolpolicy", "strict", namespace, "Accepted", "Valid")

    # Accepted by the schema, refused by the model.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=policy_manifest("strict", **bad_edit))
    policy = cluster.wait_for(
        lambda: (p := get_json(cluster, "mcptoolpolicy", "strict", "-n", namespace))
        and (c := condition(p, "Accepted")) and c["status"] == "False" and c["observedGeneration"] == 2 and p,
        timeout=30, what="the policy to say it is not accepted")
    reconciled(cluster, namespace, "after-edit")  # the servers were rendered with the edit
    assert policy_spec(cluster, namespace, "tools") == before, "the sidecar keeps the last valid policy"
    message = condition(policy, "Accepted")["message"]
    assert field in message and "generation 1 stays in force" in message, message
    assert policy["status"]["servers"] == ["tools"], "the accepted generation still applies there"
    assert policy["status"]["acceptedGeneration"] == 1

    server = wait_condition(cluster, "mcpserver", "tools", namespace, "PolicyApplied", "InvalidPolicy")
    applied = condition(server, "PolicyApplied")
    assert applied["status"] == "False"
    assert "MCPToolPolicy strict generation 2 is invalid" in applied["message"] and field in applied["message"]
    assert policy_spec(cluster, namespace, "tools") == before
    cluster.wait_for(lambda: events(cluster, namespace, "MCPToolPolicy", "strict", "InvalidPolicy"), timeout=30,
                     what="an InvalidPolicy Event on the policy")
    cluster.wait_for(lambda: events(cluster, namespace, "MCPServer", "tools", "InvalidPolicy"), timeout=30,
                     what="an InvalidPolicy Event on the server")

    # A valid edit is taken again: the old spec was kept, not frozen.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=policy_manifest("strict", auth=AUTH))
    cluster.wait_for(lambda: "timeouts" not in (policy_spec(cluster, namespace, "tools") or {"timeouts": 1}),
                     timeout=30, what="the next valid generation in the ConfigMap")
    wait_condition(cluster, "mcpserver", "tools", namespace, "PolicyApplied", "Merged")


def test_a_policy_never_accepted_is_named_not_observability_only(cluster, namespace, operator):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=policy_manifest("broken", auth=TWO_SAME_ISSUERS))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("fresh"))
    server = wait_condition(cluster, "mcpserver", "fresh", namespace, "PolicyApplied", "InvalidPolicy")
    applied = condition(server, "PolicyApplied")
    assert applied["status"] == "False" and "broken" in applied["message"] and "spec.auth" in applied["message"]
    assert "observability only" not in applied["message"]


def test_policy_status_and_columns_say_what_applies(cluster, namespace, operator):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("search"))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=policy_manifest("auth-team", auth=AUTH))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=policy_manifest(
        "cache-team", precedence=5, cache={"ttlSeconds": 9}))
    server = cluster.wait_for(
        lambda: (s := get_json(cluster, "mcpserver", "search", "-n", namespace))
        and (c := condition(s, "PolicyApplied")) and "cache-team" in c["message"] and "auth-team" in c["message"]
        and s, timeout=30, what="both policies merged")
    message = condition(server, "PolicyApplied")["message"]
    assert "auth from auth-team" in message and "cache from cache-team" in message, message
    cluster.wait_for(lambda: all((get_json(cluster, "mcptoolpolicy", n, "-n", namespace).get("status") or {})
                                 .get("servers") == ["search"] for n in ("auth-team", "cache-team")),
                     timeout=30, what="both policies to list the server")
    table = cluster.kubectl("get", "mcptoolpolicies", "-n", namespace).stdout.splitlines()
    header = table[0].split()
    assert "ACCEPTED" in header and "SERVERS" in header, header
    rows = [dict(zip(header, line.split())) for line in table[1:]]
    assert {r["NAME"]: (r["ACCEPTED"], r["SERVERS"]) for r in rows} == {
        "auth-team": ("True", "1"), "cache-team": ("True", "1")}


# --- 2. an MCPServer never takes over what it did not create -------------------------------------------------------

def existing_objects(name: str) -> list[tuple[str, str, dict]]:
    """A Service, a ConfigMap, a ServiceAccount and a Deployment someone else made, named as toolmesh would."""
    labels = {"app": name}
    return [
        ("service", name, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
                           "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}}),
        ("configmap", f"{name}-policy", {"apiVersion": "v1", "kind": "ConfigMap",
                                         "metadata": {"name": f"{name}-policy"}, "data": {"keep": "me"}}),
        ("serviceaccount", name, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}),
        ("deployment", name, {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                              "spec": {"replicas": 0, "selector": {"matchLabels": labels}, "template": {
                                  "metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "app", "image": "example.org/app:1"}]}}}}),
    ]


def snapshot(cluster, namespace: str, kind: str, name: str) -> str:
    return json.dumps(get_json(cluster, kind, name, "-n", namespace), sort_keys=True)


def settled_deployment(cluster, namespace: str, name: str):
    """The controller-manager has written what it writes on a new Deployment; after this nobody changes it."""
    return cluster.wait_for(
        lambda: (d := get_json(cluster, "deployment", name, "-n", namespace))
        and (d.get("status") or {}).get("observedGeneration") == d["metadata"]["generation"]
        and "deployment.kubernetes.io/revision" in (d["metadata"].get("annotations") or {}) and d,
        timeout=30, what=f"Deployment {name} to settle")


@pytest.mark.parametrize("kind, child", [
    ("Service", "service"), ("ConfigMap", "configmap"), ("ServiceAccount", "serviceaccount"),
    ("Deployment", "deployment"),
])
def test_an_existing_object_is_never_taken_over_nor_deleted(cluster, namespace, operator, kind, child):
    _, name, manifest = next(o for o in existing_objects("api") if o[0] == child)
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    if child == "deployment":
        settled_deployment(cluster, namespace, name)
    before = snapshot(cluster, namespace, child, name)

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("api"))
    handled(cluster, namespace, "api")
    assert snapshot(cluster, namespace, child, name) == before, f"the {kind} was changed"
    server = wait_condition(cluster, "mcpserver", "api", namespace, "Ready", "NameConflict")
    ready = condition(server, "Ready")
    assert ready["status"] == "False" and f"{kind} {name} already exists" in ready["message"], ready
    assert not server["status"].get("endpoint"), "no endpoint for a Service that is not the server's"
    cluster.wait_for(lambda: events(cluster, namespace, "MCPServer", "api", "NameConflict"), timeout=30,
                     what="a NameConflict Event")
    reconciled(cluster, namespace, "later")  # everything the operator had queued is done
    assert snapshot(cluster, namespace, child, name) == before, f"the {kind} was changed"
    assert len(events(cluster, namespace, "MCPServer", "api", "NameConflict")) == 1

    # Deleting the MCPServer deletes only what it made: once the garbage collector removed the children of
    # another server deleted alongside, it has had its chance at ours too.
    cluster.kubectl("delete", "mcpserver", "api", "later", "-n", namespace, "--wait=true", timeout=60)
    cluster.wait_for(lambda: get_json(cluster, "service", "later", "-n", namespace) is None, timeout=60,
                     what="the garbage collector to delete the other server's children")
    assert snapshot(cluster, namespace, child, name) == before, f"the {kind} was changed or deleted"


def test_the_conflict_resolves_once_the_object_is_gone(cluster, namespace, operator):
    cluster.kubectl("create", "service", "clusterip", "mine", "--tcp=80:8080", "-n", namespace)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("mine"))
    wait_condition(cluster, "mcpserver", "mine", namespace, "Ready", "NameConflict")
    assert get_json(cluster, "deployment", "mine", "-n", namespace) is None, "nothing applied while blocked"
    cluster.kubectl("delete", "service", "mine", "-n", namespace)
    service = cluster.wait_for(lambda: (s := get_json(cluster, "service", "mine", "-n", namespace))
                               and s["metadata"].get("ownerReferences") and s, timeout=60,
                               what="the operator to look again and create its own Service")
    assert service["spec"]["ports"][0]["port"] == 7400
    server = wait_condition(cluster, "mcpserver", "mine", namespace, "Ready", ("Progressing", "Available"))
    assert server["status"]["endpoint"] == f"http://mine.{namespace}.svc:7400/mcp"


def test_a_server_named_default_leaves_the_default_service_account_alone(cluster, namespace, operator):
    before = snapshot(cluster, namespace, "serviceaccount", "default")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=server_manifest("default"))
    server = wait_condition(cluster, "mcpserver", "default", namespace, "Ready", "NameConflict")
    assert "ServiceAccount default" in condition(server, "Ready")["message"]
    assert snapshot(cluster, namespace, "serviceaccount", "default") == before


# --- a tenant who may only edit MCPServers and MCPToolPolicies -----------------------------------------------------

def tenant(cluster, namespace: str) -> str:
    """A ServiceAccount whose Role grants exactly MCPServers and MCPToolPolicies in its namespace."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tenant"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "mcp-editor"},
         "rules": [{"apiGroups": ["toolmesh.io"], "resources": ["mcpservers", "mcptoolpolicies"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "tenant"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mcp-editor"},
         "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}]},
    ]))
    return f"--as=system:serviceaccount:{namespace}:tenant"


def test_a_tenant_cannot_change_what_toolmesh_did_not_create_nor_loosen_a_policy(cluster, namespace, operator):
    as_tenant = tenant(cluster, namespace)
    assert cluster.kubectl("auth", "can-i", "patch", "services", as_tenant, "-n", namespace,
                           check=False).stdout.strip() == "no"

    # The platform team's own objects, named as toolmesh would name a server's.
    for child, name, manifest in existing_objects("api"):
        cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    settled_deployment(cluster, namespace, "api")
    objects = [(child, name) for child, name, _ in existing_objects("api")] + [("serviceaccount", "default")]
    before = {key: snapshot(cluster, namespace, *key) for key in objects}

    for name in ("api", "default"):
        cluster.kubectl(as_tenant, "apply", "-n", namespace, "-f", "-", input=server_manifest(name))
    handled(cluster, namespace, "default")
    reconciled(cluster, namespace, "probe")
    for key in objects:
        assert snapshot(cluster, namespace, *key) == before[key], f"{key} changed"
    for name in ("api", "default"):
        wait_condition(cluster, "mcpserver", name, namespace, "Ready", "NameConflict")

    # The tenant's own server, protected by the tenant's policy; a bad edit leaves the protection on.
    cluster.kubectl(as_tenant, "apply", "-n", namespace, "-f", "-", input=server_manifest("tools"))
    cluster.kubectl(as_tenant, "apply", "-n", namespace, "-f", "-", input=policy_manifest("guard", auth=AUTH))
    cluster.wait_for(lambda: (policy_spec(cluster, namespace, "tools") or {}).get("auth"), timeout=30,
                     what="the tenant's auth section in the ConfigMap")
    wait_condition(cluster, "mcptoolpolicy", "guard", namespace, "Accepted", "Valid")
    auth = policy_spec(cluster, namespace, "tools")["auth"]
    cluster.kubectl(as_tenant, "apply", "-n", namespace, "-f", "-", input=policy_manifest(
        "guard", auth=TWO_SAME_ISSUERS))
    wait_condition(cluster, "mcpserver", "tools", namespace, "PolicyApplied", "InvalidPolicy")
    assert policy_spec(cluster, namespace, "tools")["auth"] == auth, "a bad edit loosened the server"
    # Nor can the tenant rewrite what the operator keeps as the last accepted spec.
    forged = cluster.kubectl(as_tenant, "patch", "mcptoolpolicy", "guard", "-n", namespace, "--subresource=status",
                             "--type=merge", "-p", json.dumps({"status": {"acceptedSpec": {}}}), check=False)
    assert forged.returncode != 0 and "forbidden" in forged.stderr

    for name in ("api", "default", "tools", "probe"):
        cluster.kubectl(as_tenant, "delete", "mcpserver", name, "-n", namespace, "--wait=true", timeout=60)
    cluster.wait_for(lambda: get_json(cluster, "deployment", "tools", "-n", namespace) is None, timeout=60,
                     what="the garbage collector to delete the tenant server's own children")
    after = {key: snapshot(cluster, namespace, *key) for key in objects}
    for key in objects:
        assert after[key] == before[key], f"{key} changed"
