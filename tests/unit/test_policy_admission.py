"""The validating webhook's verdict on an MCPToolPolicy or MCPServer edit, its configuration, and the patch that points
the chart's configuration at a local operator."""

from __future__ import annotations

import base64

import kopf
import pytest

from toolmesh.operator.handlers import validate_policy, validate_server
from toolmesh.operator.validation import (
    VALIDATION, policy_refusal, render_validating_configuration, server_refusal,
)
from toolmesh.operator.webhook import WebhookEndpoint, client_config_patch, restore_patch

AUTH = {"issuers": [{"issuer": "https://idp.example", "audiences": ["mcp"], "secret": "s3cret"}]}
TWO_SAME_ISSUERS = {"issuers": [{"issuer": "https://idp.example", "audiences": ["mcp"], "secret": "a"},
                                {"issuer": "https://idp.example", "audiences": ["mcp"], "secret": "b"}]}
BAD_TIMEOUTS = {"auth": AUTH, "timeouts": {"callSeconds": 120, "maxSeconds": 60}}


def policy(spec: dict, **metadata) -> dict:
    return {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy",
            "metadata": {"name": "strict", "namespace": "team-a", "generation": 1, **metadata}, "spec": spec}


def server(spec: dict, **metadata) -> dict:
    return {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
            "metadata": {"name": "tools", "namespace": "team-a", **metadata},
            "spec": {"image": "example.org/mcp:1", **spec}}


@pytest.mark.parametrize("spec, refusal", [
    ({"auth": TWO_SAME_ISSUERS}, "spec.auth: issuers must have distinct `issuer` values"),
    (BAD_TIMEOUTS, "spec.timeouts: maxSeconds must be at least callSeconds"),
    ({"authorization": {"defaultScopes": ["mcp:admin"]}}, "spec: authorization needs auth"),
], ids=["duplicate-issuers", "bad-timeouts", "authorization-without-auth"])
def test_a_policy_the_model_refuses_is_refused_naming_the_field(spec, refusal):
    assert refusal in policy_refusal(policy(spec))
    assert refusal in policy_refusal(policy(spec), old=policy({"auth": AUTH}))


def test_a_valid_policy_is_admitted():
    assert policy_refusal(policy({"auth": AUTH, "timeouts": {"callSeconds": 10, "maxSeconds": 60}})) is None
    assert policy_refusal(policy({})) is None
    assert policy_refusal(policy({"auth": AUTH}), old=policy({"auth": TWO_SAME_ISSUERS})) is None, "a fix"


def test_an_update_leaving_an_invalid_spec_as_it_was_is_admitted():
    """Stored before the webhook existed (or while it was down): labels, finalizers and deletion must still work."""
    stored = policy({"auth": TWO_SAME_ISSUERS})
    assert policy_refusal(policy({"auth": TWO_SAME_ISSUERS}, labels={"team": "a"}), old=stored) is None
    assert policy_refusal(policy({"auth": TWO_SAME_ISSUERS}, deletionTimestamp="2030-01-01T00:00:00Z",
                                 finalizers=[]), old=stored) is None
    assert "spec.timeouts" in policy_refusal(policy({"auth": TWO_SAME_ISSUERS, **BAD_TIMEOUTS}), old=stored)


def test_a_server_whose_inline_policy_the_model_refuses_is_refused_naming_the_field():
    refusal = server_refusal(server({"policy": {"auth": TWO_SAME_ISSUERS}}))
    assert refusal == "spec.policy.auth: issuers must have distinct `issuer` values"
    assert server_refusal(server({"policy": BAD_TIMEOUTS})).startswith("spec.policy.timeouts: ")
    assert server_refusal(server({"port": 0})).startswith("spec.port: ")
    assert server_refusal(server({"policy": {"auth": AUTH}})) is None
    assert server_refusal(server({})) is None
    stored = server({"policy": {"auth": TWO_SAME_ISSUERS}})
    assert server_refusal(server({"policy": {"auth": TWO_SAME_ISSUERS}}, finalizers=["toolmesh.io/finalizer"]),
                          old=stored) is None, "the operator's own finalizer must never be refused"


async def test_the_handlers_answer_an_admission_error_the_apiserver_shows():
    with pytest.raises(kopf.AdmissionError) as refused:
        await validate_policy(body=kopf.Body(policy({"auth": TWO_SAME_ISSUERS})), old=None)
    assert refused.value.code == 422
    assert str(refused.value) == "spec.auth: issuers must have distinct `issuer` values"
    await validate_policy(body=kopf.Body(policy({"auth": AUTH})), old=None)
    with pytest.raises(kopf.AdmissionError, match=r"^spec\.policy\.timeouts: "):
        await validate_server(body=kopf.Body(server({"policy": BAD_TIMEOUTS})), old=None)
    unchanged = server({"policy": BAD_TIMEOUTS})
    await validate_server(body=kopf.Body(unchanged), old=kopf.Body(unchanged))


def test_configuration_checks_policy_and_server_edits_where_the_operator_serves():
    config = render_validating_configuration(WebhookEndpoint(url="https://127.0.0.1:7443"), b"CA", "toolmesh-system")
    assert config["kind"] == "ValidatingWebhookConfiguration"
    assert config["metadata"]["name"] == "toolmesh-policy-validator"
    paths = {}
    for hook in config["webhooks"]:
        assert hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "None" and hook["timeoutSeconds"] == 10
        [rule] = hook["rules"]
        assert rule["apiGroups"] == ["toolmesh.io"] and rule["operations"] == ["CREATE", "UPDATE"]
        assert hook["clientConfig"]["caBundle"] == base64.b64encode(b"CA").decode()
        paths[rule["resources"][0]] = hook["clientConfig"]["url"]
        [skipped] = hook["namespaceSelector"]["matchExpressions"]
        assert skipped["operator"] == "NotIn" and {"kube-system", "toolmesh-system"} <= set(skipped["values"])
    assert paths == {"mcptoolpolicies": "https://127.0.0.1:7443/validate-policies",
                     "mcpservers": "https://127.0.0.1:7443/validate-servers"}

    labelled = render_validating_configuration(WebhookEndpoint(url="https://h"), b"CA", "ops", failure_policy="Fail",
                                               namespace_selector={"team": "yes"}, namespaces=["b", "a", "b"])
    for hook in labelled["webhooks"]:
        assert hook["failurePolicy"] == "Fail"
        assert hook["namespaceSelector"]["matchExpressions"][:2] == [
            {"key": "team", "operator": "In", "values": ["yes"]},
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["a", "b"]}]


def test_a_local_operator_replaces_each_client_config_with_its_own_path_and_puts_the_charts_back():
    chart = render_validating_configuration(
        WebhookEndpoint(service_name="toolmesh-operator", service_namespace="toolmesh-system"), b"", "toolmesh-system")
    chart["webhooks"].insert(0, {"name": "someone-elses.example.org", "clientConfig": {"url": "https://x"}})
    local = WebhookEndpoint(url="https://127.0.0.1:9443")
    ops = client_config_patch(chart, local, b"CA", VALIDATION)
    assert ops == [
        {"op": "test", "path": "/webhooks/1/name", "value": "mcptoolpolicies.validate.toolmesh.io"},
        {"op": "replace", "path": "/webhooks/1/clientConfig", "value": local.client_config(b"CA", "validate-policies")},
        {"op": "test", "path": "/webhooks/2/name", "value": "mcpservers.validate.toolmesh.io"},
        {"op": "replace", "path": "/webhooks/2/clientConfig", "value": local.client_config(b"CA", "validate-servers")},
    ]
    saved = {h["name"]: h["clientConfig"] for h in chart["webhooks"][1:]}
    assert [op["value"] for op in restore_patch(chart, saved) if op["op"] == "replace"] == list(saved.values())
