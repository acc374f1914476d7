"""The validating webhook on a real apiserver: `kubectl apply` of a policy the schema accepts but the model refuses
fails, naming the field, and nothing is stored; a valid one is admitted."""

from __future__ import annotations

import pytest
import yaml

from helpers.operator_proc import condition, get_json, install_crds, operator_running

pytestmark = pytest.mark.cluster

OPERATOR_NAMESPACE = "toolmesh-admission-test"
VALIDATING_CONFIGURATION = "toolmesh-policy-validator"
AUTH = {"issuers": [{"issuer": "https://idp.example", "audiences": ["mcp"], "secret": "s3cret"}]}
TWO_SAME_ISSUERS = {"issuers": [{"issuer": "https://idp.example", "audiences": ["mcp"], "secret": "a"},
                                {"issuer": "https://idp.example", "audiences": ["mcp"], "secret": "b"}]}
# The bad edits of test_operator_trust.py's test_an_invalid_policy_edit_keeps_the_last_valid_policy.
BAD_EDITS = [
    pytest.param({"auth": TWO_SAME_ISSUERS}, "spec.auth: issuers must have distinct `issuer` values",
                 id="duplicate-issuers"),
    pytest.param({"auth": AUTH, "timeouts": {"callSeconds": 120, "maxSeconds": 60}},
                 "spec.timeouts: maxSeconds must be at least callSeconds", id="bad-timeouts"),
]


@pytest.fixture(scope="module")
def operator(cluster, tmp_path_factory):
    install_crds(cluster)
    with operator_running(cluster, tmp_path_factory.mktemp("operator") / "operator.log",
                          namespace=OPERATOR_NAMESPACE) as op:
        yield op
    # The operator made the configuration itself, so it removes it when it stops.
    assert get_json(cluster, "validatingwebhookconfiguration", VALIDATING_CONFIGURATION) is None


def policy_manifest(name: str, **spec) -> str:
    return yaml.safe_dump({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy",
                           "metadata": {"name": name}, "spec": spec})


def server_manifest(name: str, **spec) -> str:
    return yaml.safe_dump({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": name},
                           "spec": {"image": "example.org/mcp:1", **spec}})


def apply(cluster, namespace: str, manifest: str, check: bool = True):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=check)


def test_the_operator_registers_the_validating_webhook_with_its_own_ca(cluster, operator):
    config = get_json(cluster, "validatingwebhookconfiguration", VALIDATING_CONFIGURATION)
    secret = get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", OPERATOR_NAMESPACE)
    paths = {}
    for hook in config["webhooks"]:
        assert hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "None"
        assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
        paths[hook["name"]] = hook["clientConfig"]["url"]
        excluded = hook["namespaceSelector"]["matchExpressions"][-1]
        assert {"kube-system", OPERATOR_NAMESPACE} <= set(excluded["values"])
    port = operator.webhook_port
    assert paths == {"mcptoolpolicies.validate.toolmesh.io": f"https://127.0.0.1:{port}/validate-policies",
                     "mcpservers.validate.toolmesh.io": f"https://127.0.0.1:{port}/validate-servers"}


@pytest.mark.parametrize("bad_edit, message", BAD_EDITS)
def test_an_invalid_policy_edit_is_refused_at_apply_naming_the_field(cluster, namespace, operator, bad_edit, message):
    valid = apply(cluster, namespace, policy_manifest(
        "strict", auth=AUTH, timeouts={"callSeconds": 10, "maxSeconds": 60}))
    assert "created" in valid.stdout, valid.stdout + valid.stderr
    before = get_json(cluster, "mcptoolpolicy", "strict", "-n", namespace)

    refused = apply(cluster, namespace, policy_manifest("strict", **bad_edit), check=False)
    assert refused.returncode != 0
    assert 'admission webhook "mcptoolpolicies.validate.toolmesh.io" denied the request' in refused.stderr
    assert message in refused.stderr, refused.stderr
    after = get_json(cluster, "mcptoolpolicy", "strict", "-n", namespace)
    assert after["metadata"]["generation"] == 1 and after["spec"] == before["spec"], "nothing was stored"

    # A new policy with the same mistake is never created.
    created = apply(cluster, namespace, policy_manifest("fresh", **bad_edit), check=False)
    assert created.returncode != 0 and message in created.stderr, created.stderr
    assert get_json(cluster, "mcptoolpolicy", "fresh", "-n", namespace) is None


def test_a_valid_policy_is_admitted_and_applied(cluster, namespace, operator):
    apply(cluster, namespace, server_manifest("tools"))
    created = apply(cluster, namespace, policy_manifest("strict", auth=AUTH))
    assert "created" in created.stdout
    edited = apply(cluster, namespace, policy_manifest(
        "strict", auth=AUTH, timeouts={"callSeconds": 10, "maxSeconds": 60}))
    assert "configured" in edited.stdout
    cluster.wait_for(lambda: (p := get_json(cluster, "mcptoolpolicy", "strict", "-n", namespace))
                     and (c := condition(p, "Accepted")) and c["status"] == "True"
                     and c["observedGeneration"] == 2, timeout=30, what="generation 2 accepted")
    # Metadata edits go through the webhook too, and are admitted.
    cluster.kubectl("label", "mcptoolpolicy", "strict", "-n", namespace, "team=a")


def test_an_mcpserver_with_an_invalid_inline_policy_is_refused_naming_the_field(cluster, namespace, operator):
    refused = apply(cluster, namespace, server_manifest("inline", policy={"auth": TWO_SAME_ISSUERS}), check=False)
    assert refused.returncode != 0
    assert 'admission webhook "mcpservers.validate.toolmesh.io" denied the request' in refused.stderr
    assert "spec.policy.auth: issuers must have distinct `issuer` values" in refused.stderr, refused.stderr
    assert get_json(cluster, "mcpserver", "inline", "-n", namespace) is None
    # The same server with a valid inline policy is created and reconciled: the operator's own writes (its
    # finalizer, its annotations) pass the webhook.
    apply(cluster, namespace, server_manifest("inline", policy={"auth": AUTH}))
    cluster.wait_for(lambda: (s := get_json(cluster, "mcpserver", "inline", "-n", namespace))
                     and (c := condition(s, "PolicyApplied")) and c["reason"] == "Merged", timeout=30,
                     what="the server reconciled with its inline policy")
