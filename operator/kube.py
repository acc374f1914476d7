"""Writes to the Kubernetes API with the official client: server-side apply under the `toolmesh` field manager."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config

FIELD_MANAGER = "toolmesh"

# kind -> (API path prefix, plural, namespaced)
_KINDS: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("/api/v1", "namespaces", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Secret": ("/api/v1", "secrets", True),
    "Service": ("/api/v1", "services", True),
    "Pod": ("/api/v1", "pods", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "MutatingWebhookConfiguration": ("/apis/admissionregistration.k8s.io/v1", "mutatingwebhookconfigurations", False),
    "MCPServer": ("/apis/toolmesh.io/v1alpha1", "mcpservers", True),
    "MCPToolPolicy": ("/apis/toolmesh.io/v1alpha1", "mcptoolpolicies", True),
}


class KubeError(Exception):
    """The API answered with an error status; `status` says which (404: gone, 409: conflict, 5xx: retry)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def load_api_client(pool_size: int = 16) -> client.ApiClient:
    """An API client from the in-cluster service account, else from the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(
            "/var/run/secrets/kubernetes.io/serviceaccount/token"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


def object_path(kind: str, name: str | None = None, namespace: str | None = None) -> str:
    prefix, plural, namespaced = _KINDS[kind]
    path = prefix
    if namespaced and namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    return path


class Kube:
    """The few API calls the operator makes, as plain dicts in and out."""

    def __init__(self, api: client.ApiClient):
        self.api = api

    def request(self, method: str, path: str, *, body: Any = None, query: list[tuple[str, str]] | None = None,
                content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        _, url, headers, body, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"])
        response = self.api.call_api(method, url, header_params=headers, body=body, _request_timeout=30)
        data = response.read()
        if not 200 <= response.status < 300:
            try:
                message = json.loads(data).get("message", "")
            except (ValueError, AttributeError):
                message = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
            raise KubeError(response.status, message)
        return json.loads(data) if data else None

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply: the API merges our fields, and a manifest equal to the last one changes nothing."""
        meta = manifest["metadata"]
        path = object_path(manifest["kind"], meta["name"], meta.get("namespace"))
        return self.request("PATCH", path, body=dict(manifest), content_type="application/apply-patch+yaml",
                            query=[("fieldManager", FIELD_MANAGER), ("force", "true")])

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return self.request("GET", object_path(kind, name, namespace))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.request("GET", object_path(kind, None, namespace)).get("items", [])

    def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        return self.request("POST", object_path(manifest["kind"], None, meta.get("namespace")), body=dict(manifest))

    def patch_status(self, kind: str, name: str, namespace: str, status: Mapping[str, Any],
                     resource_version: str | None = None) -> dict[str, Any] | None:
        """Merge-patch the status subresource; None when the object is gone.

        With `resource_version` the write only lands on that version (KubeError 409 otherwise): status lists
        such as conditions are replaced whole, so two writers must not interleave read and write.
        """
        path = object_path(kind, name, namespace) + "/status"
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            return self.request("PATCH", path, body=body, content_type="application/merge-patch+json")
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
