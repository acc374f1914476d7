"""The chart's ValidatingWebhookConfiguration on a real apiserver: installed with the chart's values, Ignore while no
operator serves it, and pointed at a local operator (with the chart's own ServiceAccount) and back like the injector."""

from __future__ import annotations

import uuid

import pytest
import yaml

from helpers import free_port, running
from helpers.chart import CHART
from helpers.operator_proc import (
    WEBHOOK_CONFIGURATION,
    can_i,
    condition,
    get_json,
    install_crds,
    kubeconfig_for,
    operator_cmd,
    stop,
    wait_listening,
)

pytestmark = pytest.mark.cluster

RELEASE = "vtrust"
FULLNAME = f"{RELEASE}-toolmesh"
VALIDATING_CONFIGURATION = "toolmesh-policy-validator"
HOOKS = {"mcptoolpolicies.validate.toolmesh.io": "/validate-policies",
         "mcpservers.validate.toolmesh.io": "/validate-servers"}
AUTH = {"issuers": [{"issuer": "https://idp.example", "audiences": ["mcp"], "secret": "s3cret"}]}
TWO_SAME_ISSUERS = {"issuers": [{"issuer": "https://idp.example", "audiences": ["mcp"], "secret": "a"},
                                {"issuer": "https://idp.example", "audiences": ["mcp"], "secret": "b"}]}
DUPLICATE = "spec.auth: issuers must have distinct `issuer` values"










def helm_install(cluster, release: str, *values: str) -> None:
    # Both configurations have fixed names: an earlier test's may still exist.
    for kind, name in (("mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION),
                       ("validatingwebhookconfiguration", VALIDATING_CONFIGURATION)):
        cluster.kubectl("delete", kind, name, "--ignore-not-found")
    cluster.helm("install", RELEASE, str(CHART), "-n", release, "--create-namespace", "--wait=false", *values,
                 timeout=180)


def helm_uninstall(cluster, release: str) -> None:
    cluster.helm("uninstall", RELEASE, "-n", release, "--ignore-not-found", check=False)
    cluster.kubectl("delete", "namespace", release, "--wait=false", check=False)


def policy_manifest(name: str, **spec) -> str:
    return yaml.safe_dump({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy",
                           "metadata": {"name": name}, "spec": spec})


def apply(cluster, namespace: str, manifest: str, check: bool = True):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=check)




def test_the_chart_installs_the_validating_webhook_with_its_values(cluster):
    install_crds(cluster)
    release = f"vtrust-values-{uuid.uuid4().hex[:6]}"
    helm_install(cluster, release, "--set", "webhook.policyValidation.failurePolicy=Fail",
                 "--set", "webhook.timeoutSeconds=7")
    try:
        config = get_json(cluster, "validatingwebhookconfiguration", VALIDATING_CONFIGURATION)
        assert config["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert {h["name"] for h in config["webhooks"]} == set(HOOKS)
        for hook in config["webhooks"]:
            assert hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] == 7 and hook["sideEffects"] == "None"
            assert hook["clientConfig"]["service"] == {"name": f"{FULLNAME}-operator", "namespace": release,
                                                       "port": 443, "path": HOOKS[hook["name"]]}
            [rule] = hook["rules"]
            assert rule["operations"] == ["CREATE", "UPDATE"] and rule["apiGroups"] == ["toolmesh.io"]
            excluded = hook["namespaceSelector"]["matchExpressions"][-1]
            assert excluded["operator"] == "NotIn" and {"kube-system", release} <= set(excluded["values"])
        sa = f"system:serviceaccount:{release}:{FULLNAME}-operator"
        assert can_i(cluster, sa, "patch", f"validatingwebhookconfigurations/{VALIDATING_CONFIGURATION}")
        assert not can_i(cluster, sa, "patch", "validatingwebhookconfigurations/other")
        assert not can_i(cluster, sa, "create", "validatingwebhookconfigurations")
        # The operator's args carry the same failurePolicy, for a configuration it would write itself.
        deployment = get_json(cluster, "deployment", f"{FULLNAME}-operator", "-n", release)
        assert "--validation-failure-policy=Fail" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    finally:
        helm_uninstall(cluster, release)
    assert get_json(cluster, "validatingwebhookconfiguration", VALIDATING_CONFIGURATION) is None


def test_a_local_operator_serves_the_charts_validating_webhook_and_gives_it_back(cluster, namespace, tmp_path):
    """Ignore (the default) lets an edit in while no operator serves the webhook; a local operator then points the
    chart's configuration at itself with its CA, refuses the next invalid edit, still admits metadata edits of the
    invalid policy stored meanwhile, and on stopping puts the chart's client configs back."""
    install_crds(cluster)
    release = f"vtrust-local-{uuid.uuid4().hex[:6]}"
    helm_install(cluster, release, "--set", "operator.replicas=0", "--set", "webhook.timeoutSeconds=7")
    try:
        chart_config = get_json(cluster, "validatingwebhookconfiguration", VALIDATING_CONFIGURATION)
        assert all(h["failurePolicy"] == "Ignore" for h in chart_config["webhooks"])
        # No operator: the apiserver cannot reach the webhook and, failurePolicy Ignore, stores the edit.
        stored = apply(cluster, namespace, policy_manifest("stored", auth=TWO_SAME_ISSUERS))
        assert "created" in stored.stdout, stored.stderr

        env = kubeconfig_for(cluster, release, f"{FULLNAME}-operator", tmp_path / "operator.kubeconfig")
        port, log = free_port(), tmp_path / "operator.log"
        with running(operator_cmd(release, port), env=env, log_path=log, stop_timeout=30) as operator:
            wait_listening(operator, port, log)
            config = get_json(cluster, "validatingwebhookconfiguration", VALIDATING_CONFIGURATION)
            secret = get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", release)
            for hook in config["webhooks"]:
                assert hook["clientConfig"] == {"url": f"https://127.0.0.1:{port}{HOOKS[hook['name']]}",
                                                "caBundle": secret["data"]["ca.crt"]}, hook["name"]
                assert hook["timeoutSeconds"] == 7 and hook["failurePolicy"] == "Ignore", "the chart's values stay"
            assert config["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"

            refused = apply(cluster, namespace, policy_manifest("strict", auth=TWO_SAME_ISSUERS), check=False)
            assert refused.returncode != 0 and DUPLICATE in refused.stderr, refused.stderr
            assert get_json(cluster, "mcptoolpolicy", "strict", "-n", namespace) is None
            assert "created" in apply(cluster, namespace, policy_manifest("strict", auth=AUTH)).stdout
            # The policy stored while nobody checked: the operator reports it, and it can still be labelled and
            # fixed, but not changed into another invalid spec.
            cluster.wait_for(lambda: (p := get_json(cluster, "mcptoolpolicy", "stored", "-n", namespace))
                             and (c := condition(p, "Accepted")) and c["status"] == "False" and p,
                             timeout=60, what="the stored invalid policy reported not accepted")
            cluster.kubectl("label", "mcptoolpolicy", "stored", "-n", namespace, "reviewed=yes")
            again = apply(cluster, namespace, policy_manifest(
                "stored", auth=TWO_SAME_ISSUERS, timeouts={"callSeconds": 120, "maxSeconds": 60}), check=False)
            assert again.returncode != 0 and "spec.timeouts" in again.stderr, again.stderr
            assert "configured" in apply(cluster, namespace, policy_manifest("stored", auth=AUTH)).stdout
            text = stop(operator, log)
        assert operator.returncode == 0, text[-3000:]
        config = get_json(cluster, "validatingwebhookconfiguration", VALIDATING_CONFIGURATION)
        assert [h["clientConfig"] for h in config["webhooks"]] == \
            [h["clientConfig"] for h in chart_config["webhooks"]]
        assert [h["timeoutSeconds"] for h in config["webhooks"]] == [7, 7]
        # Nobody serves it again: an invalid edit is let in, as the chart's Ignore says.
        assert apply(cluster, namespace, policy_manifest("later", auth=TWO_SAME_ISSUERS), check=False).returncode == 0
    finally:
        helm_uninstall(cluster, release)


def test_with_fail_an_edit_is_refused_while_no_operator_serves_the_webhook(cluster, namespace):
    install_crds(cluster)
    release = f"vtrust-fail-{uuid.uuid4().hex[:6]}"
    helm_install(cluster, release, "--set", "operator.replicas=0",
                 "--set", "webhook.policyValidation.failurePolicy=Fail")
    try:
        refused = apply(cluster, namespace, policy_manifest("valid", auth=AUTH), check=False)
        assert refused.returncode != 0
        assert "mcptoolpolicies.validate.toolmesh.io" in refused.stderr, refused.stderr
        assert get_json(cluster, "mcptoolpolicy", "valid", "-n", namespace) is None
        # The operator's own namespace and the system ones are never checked.
        outside = apply(cluster, release, policy_manifest("valid", auth=AUTH), check=False)
        assert outside.returncode == 0, outside.stderr
    finally:
        helm_uninstall(cluster, release)
