"""Writes to the Kubernetes API with the official client: server-side apply under the `toolmesh` field manager."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from toolmesh.api.kube import KubeClient, KubeError, load_api_client

__all__ = ["FIELD_MANAGER", "AsyncKube", "Kube", "KubeError", "load_api_client", "object_path"]

T = TypeVar("T")

FIELD_MANAGER = "toolmesh"
CREATE_ONLY = str(2**64 - 1)
"""A resourceVersion no object ever has: an apply whose manifest carries it creates the object or fails with 409,
never writing to one that exists (the apiserver ignores a resourceVersion on create, checks it on update)."""

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
    "ValidatingWebhookConfiguration": ("/apis/admissionregistration.k8s.io/v1", "validatingwebhookconfigurations",
                                       False),
    "MCPServer": ("/apis/toolmesh.io/v1alpha1", "mcpservers", True),
    "MCPToolPolicy": ("/apis/toolmesh.io/v1alpha1", "mcptoolpolicies", True),
}


def object_path(kind: str, name: str | None = None, namespace: str | None = None) -> str:
    prefix, plural, namespaced = _KINDS[kind]
    path = prefix
    if namespaced and namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    return path


class Kube(KubeClient):
    """The few API calls the operator makes, as plain dicts in and out."""

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply: the API merges our fields, and a manifest equal to the last one changes nothing.

        Forced, so our own children follow the manifest whoever edited them; callers writing to children therefore
        pin the apply in the manifest: `metadata.uid` of the child they own (422 or 409 if it was replaced or is
        gone), or `metadata.resourceVersion: CREATE_ONLY` for one that must not exist yet (409 if it does).
        """
        meta = manifest["metadata"]
        path = object_path(manifest["kind"], meta["name"], meta.get("namespace"))
        return self.request("PATCH", path, body=dict(manifest), content_type="application/apply-patch+yaml",
                            query=[("fieldManager", FIELD_MANAGER), ("force", "true")])

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return self.request("GET", object_path(kind, name, namespace), missing_ok=True)

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
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json", missing_ok=True)


class AsyncKube:
    """`Kube` for the event loop: each blocking request runs on a pool of threads, one per pooled connection.

    The threads only carry requests: what is written and in which order is decided on the loop, so nothing here
    needs a lock. A reconcile waits for a free thread, never the loop.
    """

    def __init__(self, kube: Kube, *, workers: int = 16):
        self.sync = kube
        """The blocking client, for code that already runs in one of the pool's threads."""
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="kube")

    async def run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`call(*args, **kwargs)` in the pool: blocking work (requests, rendering that reads Secrets) off the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(call, *args, **kwargs))

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        return await self.run(self.sync.apply, manifest)

    async def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return await self.run(self.sync.get, kind, name, namespace)

    async def patch_status(self, kind: str, name: str, namespace: str, status: Mapping[str, Any],
                           resource_version: str | None = None) -> dict[str, Any] | None:
        return await self.run(self.sync.patch_status, kind, name, namespace, status, resource_version)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
