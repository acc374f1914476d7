"""The validating admission webhook: refuses an MCPToolPolicy or MCPServer spec the model refuses, naming the field."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from toolmesh.api.policy import MCPToolPolicySpec, describe_validation_error
from toolmesh.api.server import GROUP, VERSION, MCPServerSpec
from toolmesh.operator.render import MANAGED_BY
from toolmesh.operator.webhook import (
    NAMESPACE_NAME_LABEL,
    WebhookConfiguration,
    WebhookEndpoint,
    admission_webhook,
    namespace_requirements,
    skipped_namespaces,
)

VALIDATING_CONFIGURATION_NAME = "toolmesh-policy-validator"
POLICY_HANDLER_ID = "validate-policies"
SERVER_HANDLER_ID = "validate-servers"
POLICY_WEBHOOK = "mcptoolpolicies.validate.toolmesh.io"
SERVER_WEBHOOK = "mcpservers.validate.toolmesh.io"
VALIDATION = WebhookConfiguration("ValidatingWebhookConfiguration", VALIDATING_CONFIGURATION_NAME, {
    POLICY_WEBHOOK: POLICY_HANDLER_ID, SERVER_WEBHOOK: SERVER_HANDLER_ID})
DEFAULT_FAILURE_POLICY = "Ignore"
"""While the operator is down an edit is let in unchecked: the operator, back, keeps the last accepted generation
of an invalid policy in force (the fail-closed merge), so nothing is loosened. Fail would refuse every policy edit,
a fix included, whenever the one operator pod restarts."""


def _unchanged(body: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    """An update that leaves the spec as it was (labels, finalizers, kopf's annotations) or one of an object being
    deleted: never refused, or an object stored before the webhook existed could not even be deleted."""
    if old is None:
        return False
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return True
    return body.get("spec") == old.get("spec")


def _refusal(model: type, data: Any, prefix: str) -> str | None:
    try:
        model.model_validate(data)
    except ValidationError as exc:
        message, _ = describe_validation_error(exc, prefix=prefix)
        return message
    return None


def policy_refusal(body: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> str | None:
    """Why this MCPToolPolicy must not be stored (`spec.auth: ...`, one part per bad field), or None to admit it."""
    if _unchanged(body, old):
        return None
    return _refusal(MCPToolPolicySpec, body.get("spec") or {}, "spec")


def server_refusal(body: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> str | None:
    """Why this MCPServer must not be stored, or None. Its inline `spec.policy` is a free-form object to the model
    of the server, so it is checked as the MCPToolPolicy spec the merge will read it as."""
    if _unchanged(body, old):
        return None
    spec = body.get("spec") or {}
    refusal = _refusal(MCPServerSpec, spec, "spec")
    if refusal is None and isinstance(spec, Mapping) and spec.get("policy") is not None:
        refusal = _refusal(MCPToolPolicySpec, spec["policy"], "spec.policy")
    return refusal


def render_validating_configuration(endpoint: WebhookEndpoint, ca: bytes, operator_namespace: str,
                                    failure_policy: str = DEFAULT_FAILURE_POLICY,
                                    namespace_selector: Mapping[str, str] | None = None,
                                    namespaces: Sequence[str] = (), timeout_seconds: int = 10) -> dict[str, Any]:
    """Checks of MCPToolPolicy and MCPServer creates and updates, in the namespaces the operator serves only: the
    names given (`--namespace`), or those carrying `namespace_selector`'s labels; never the system ones nor its own.
    """
    exprs = namespace_requirements(namespace_selector)
    if namespaces:
        exprs.append({"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": sorted(set(namespaces))})
    exprs.append({"key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": skipped_namespaces(operator_namespace)})

    def webhook(name: str, plural: str) -> dict[str, Any]:
        return {
            **admission_webhook(name, failure_policy, timeout_seconds),
            "rules": [{"apiGroups": [GROUP], "apiVersions": [VERSION], "resources": [plural],
                       "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}],
            "clientConfig": endpoint.client_config(ca, VALIDATION.hooks[name]),
            "namespaceSelector": {"matchExpressions": [dict(e) for e in exprs]},
        }

    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": VALIDATION.kind,
        "metadata": {"name": VALIDATION.name, "labels": dict(MANAGED_BY)},
        "webhooks": [webhook(POLICY_WEBHOOK, "mcptoolpolicies"), webhook(SERVER_WEBHOOK, "mcpservers")],
    }
