"""The sidecar-injecting admission webhook: its MutatingWebhookConfiguration and the decision for one pod."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from toolmesh.operator.inject import INJECT_LABEL, SidecarOptions, inject_pod, is_injected, options_from_pod
from toolmesh.operator.render import MANAGED_BY

CONFIGURATION_NAME = "toolmesh-sidecar-injector"
HANDLER_ID = "inject-pods"
ALWAYS_SKIPPED = ("kube-system", "kube-public", "kube-node-lease")
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


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

    def client_config(self, ca: bytes) -> dict[str, Any]:
        config: dict[str, Any] = {"caBundle": base64.b64encode(ca).decode()}
        if self.service_name:
            config["service"] = {"name": self.service_name, "namespace": self.service_namespace,
                                 "port": self.service_port, "path": f"/{HANDLER_ID}"}
        else:
            assert self.url, "a webhook endpoint needs a URL or a Service"
            config["url"] = f"{self.url.rstrip('/')}/{HANDLER_ID}"
        return config


def skipped_namespaces(operator_namespace: str) -> list[str]:
    """Namespaces never injected: the system ones and the operator's own (it must always be able to start)."""
    return sorted({*ALWAYS_SKIPPED, operator_namespace})


def render_webhook_configuration(endpoint: WebhookEndpoint, ca: bytes, operator_namespace: str,
                                 failure_policy: str = "Fail") -> dict[str, Any]:
    """Two webhooks: pods labelled for injection, and unlabelled pods in namespaces labelled for it.

    failurePolicy Fail by default: a pod that asked for the sidecar must not start without the policy in front.
    """
    not_skipped = {"key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": skipped_namespaces(operator_namespace)}

    def webhook(name: str, object_selector: dict[str, Any], namespace_exprs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure_policy,
            "matchPolicy": "Equivalent",
            # Injection is idempotent, so being called again after other webhooks changed the pod is harmless.
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": 10,
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "operations": ["CREATE"],
                       "scope": "Namespaced"}],
            "clientConfig": endpoint.client_config(ca),
            "objectSelector": object_selector,
            "namespaceSelector": {"matchExpressions": [*namespace_exprs, not_skipped]},
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


def injection_for(pod: Mapping[str, Any], namespace: str | None, *, image: str, registry_url: str | None,
                  skipped: Iterable[str]) -> SidecarOptions | None:
    """The sidecar this pod should get, or None when it must be left alone. InjectionError for bad annotations."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if namespace in set(skipped) or labels.get(INJECT_LABEL) == "false" or is_injected(pod):
        return None
    return options_from_pod(pod, image=image, registry_url=registry_url)


def mutate(pod: dict[str, Any], options: SidecarOptions) -> None:
    """Inject in place (the form kopf's patch functions take), through the one shared injection."""
    injected = inject_pod(pod, options)
    pod.clear()
    pod.update(injected)
