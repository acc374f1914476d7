"""The sidecar-injecting admission webhook: its MutatingWebhookConfiguration and the decision for one pod."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from toolmesh.operator.inject import (
    INJECT_LABEL, SidecarOptions, StateStore, inject_pod, is_injected, options_from_pod,
)
from toolmesh.operator.render import MANAGED_BY

CONFIGURATION_NAME = "toolmesh-sidecar-injector"
HANDLER_ID = "inject-pods"
ALWAYS_SKIPPED = ("kube-system", "kube-public", "kube-node-lease")
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class WebhookConfiguration:
    """One admission webhook configuration the operator serves: which object, and the webhooks in it that are ours."""

    kind: str
    """MutatingWebhookConfiguration or ValidatingWebhookConfiguration."""
    name: str
    """Its fixed name (the chart creates the same one; the operator patches it)."""
    hooks: Mapping[str, str] = field(default_factory=dict)
    """Webhook name -> the id of the kopf handler serving it (the path the apiserver calls)."""


INJECTION = WebhookConfiguration("MutatingWebhookConfiguration", CONFIGURATION_NAME, {
    "pods.inject.toolmesh.io": HANDLER_ID, "namespaces.inject.toolmesh.io": HANDLER_ID})


@dataclass(frozen=True)
class WebhookEndpoint:
    """Where the apiserver reaches the webhook: a URL (operator outside the cluster) or a Service."""

    url: str | None = None
    """Base URL, e.g. https://127.0.0.1:7443 (the handler id is appended)."""
    service_name: str | None = None
    """Service in the operator's namespace fronting the webhook, when running in the cluster."""
    service_namespace: str | None = None
    """Namespace of that Service."""
    service_port: int = 443
    """Port of that Service."""

    def client_config(self, ca: bytes, handler_id: str = HANDLER_ID) -> dict[str, Any]:
        """How the apiserver calls the handler `handler_id` (kopf serves each handler at `/<id>`)."""
        config: dict[str, Any] = {"caBundle": base64.b64encode(ca).decode()}
        if self.service_name:
            config["service"] = {"name": self.service_name, "namespace": self.service_namespace,
                                 "port": self.service_port, "path": f"/{handler_id}"}
        else:
            assert self.url, "a webhook endpoint needs a URL or a Service"
            config["url"] = f"{self.url.rstrip('/')}/{handler_id}"
        return config


def skipped_namespaces(operator_namespace: str) -> list[str]:
    """Namespaces never injected: the system ones and the operator's own (it must always be able to start)."""
    return sorted({*ALWAYS_SKIPPED, operator_namespace})


def namespace_requirements(selector: Mapping[str, str] | None) -> list[dict[str, Any]]:
    """A namespace label selector (`{label: value}`) as matchExpressions; an empty one selects every namespace."""
    return [{"key": key, "operator": "In", "values": [value]} for key, value in sorted((selector or {}).items())]


def admission_webhook(name: str, failure_policy: str, timeout_seconds: int) -> dict[str, Any]:
    """What every webhook of ours says of itself, whatever it admits; rules, selectors and client are its own."""
    return {
        "name": name,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": failure_policy,
        "matchPolicy": "Equivalent",
        "timeoutSeconds": timeout_seconds,
    }


def render_webhook_configuration(endpoint: WebhookEndpoint, ca: bytes, operator_namespace: str,
                                 failure_policy: str = "Fail",
                                 namespace_selector: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Two webhooks: pods labelled for injection, and unlabelled pods in namespaces labelled for it.

    failurePolicy Fail by default: a pod that asked for the sidecar must not start without the policy in front.
    With `namespace_selector`, only namespaces carrying those labels are served (the operator's label mode).
    """
    not_skipped = {"key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": skipped_namespaces(operator_namespace)}
    selected = namespace_requirements(namespace_selector)

    def webhook(name: str, object_selector: dict[str, Any], namespace_exprs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            **admission_webhook(name, failure_policy, 10),
            # Never: the sidecar is complete once added and nothing a later plugin adds (the ServiceAccount
            # plugin's token volume, another webhook's containers) calls for it again. IfNeeded made every
            # labelled pod cost two calls, the second one changing nothing.
            "reinvocationPolicy": "Never",
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "operations": ["CREATE"],
                       "scope": "Namespaced"}],
            "clientConfig": endpoint.client_config(ca),
            "objectSelector": object_selector,
            "namespaceSelector": {"matchExpressions": [*namespace_exprs, *selected, not_skipped]},
        }

    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIGURATION_NAME, "labels": dict(MANAGED_BY)},
        "webhooks": [
            webhook("pods.inject.toolmesh.io", {"matchLabels": {INJECT_LABEL: "true"}}, []),
            webhook("namespaces.inject.toolmesh.io",
                    {"matchExpressions": [{"key": INJECT_LABEL, "operator": "DoesNotExist"}]},
                    [{"key": INJECT_LABEL, "operator": "In", "values": ["true"]}]),
        ],
    }


def client_config_patch(existing: Mapping[str, Any], endpoint: WebhookEndpoint, ca: bytes,
                        configuration: WebhookConfiguration = INJECTION) -> list[dict[str, Any]]:
    """A JSON patch giving each of our webhooks in `existing` (e.g. the chart's) this endpoint and CA, nothing else.

    The client config is replaced whole: a URL merged into the chart's `service` entry would hold both, which the
    API refuses. Everything else (timeoutSeconds, failurePolicy, selectors) stays as its owner wrote it. Each
    replacement is guarded by a test of the webhook's name, so a concurrent reorder fails instead of misapplying.
    """
    ops: list[dict[str, Any]] = []
    for index, hook in enumerate(existing.get("webhooks") or []):
        handler_id = configuration.hooks.get(hook.get("name"))
        if handler_id is not None:
            ops += [{"op": "test", "path": f"/webhooks/{index}/name", "value": hook["name"]},
                    {"op": "replace", "path": f"/webhooks/{index}/clientConfig",
                     "value": endpoint.client_config(ca, handler_id)}]
    return ops


def restore_patch(existing: Mapping[str, Any], saved: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A JSON patch putting back the client configs `saved` (webhook name -> clientConfig) into `existing`."""
    ops: list[dict[str, Any]] = []
    for index, hook in enumerate(existing.get("webhooks") or []):
        if hook.get("name") in saved:
            ops += [{"op": "test", "path": f"/webhooks/{index}/name", "value": hook["name"]},
                    {"op": "replace", "path": f"/webhooks/{index}/clientConfig", "value": dict(saved[hook["name"]])}]
    return ops


def injection_for(pod: Mapping[str, Any], namespace: str | None, *, image: str, registry_url: str | None,
                  skipped: Iterable[str], state: StateStore | None = None) -> SidecarOptions | None:
    """The sidecar this pod should get, or None when it must be left alone. InjectionError for bad annotations."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if namespace in set(skipped) or labels.get(INJECT_LABEL) == "false" or is_injected(pod):
        return None
    return options_from_pod(pod, image=image, registry_url=registry_url, state=state)


def mutate(pod: dict[str, Any], options: SidecarOptions) -> None:
    """Inject in place (the form kopf's patch functions take), through the one shared injection."""
    injected = inject_pod(pod, options)
    pod.clear()
    pod.update(injected)
