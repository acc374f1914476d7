"""Makes the cluster match the renderers: applies what changed, and writes status on MCPServers and policies."""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from toolmesh.operator.kube import Kube, KubeError
from toolmesh.operator.merge import PolicySource
from toolmesh.operator.render import (
    OperatorConfig, digest, policy_status, ready_condition, render_server, server_status, set_condition,
)

log = logging.getLogger("toolmesh.operator")

# Status fields the operator owns; the registry owns toolCount, tools, lastHeartbeat, healthyInstances, Healthy.
OWNED_STATUS = ("observedGeneration", "endpoint", "appliedPolicies", "policyHash")
CONFLICT_RETRIES = 8


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owned(status: dict[str, Any]) -> dict[str, Any]:
    """The whole operator-owned status: a field no longer true is sent as null, which a merge patch removes."""
    for name in OWNED_STATUS:
        status.setdefault(name, None)
    return status


def _namespace_terminating(exc: KubeError) -> bool:
    """The API refused to create in a namespace that is being deleted (403 NamespaceTerminating)."""
    return exc.status == 403 and "being terminated" in str(exc)


def _owner_reference(child: Mapping[str, Any]) -> dict[str, Any] | None:
    """The owner reference naming the MCPServer a child belongs to."""
    return next((o for o in child["metadata"].get("ownerReferences") or [] if o.get("kind") == "MCPServer"), None)


def _key(manifest: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = manifest["metadata"]
    return manifest["kind"], meta.get("namespace", ""), meta["name"]


@dataclass
class Reconciler:
    """The operator's state across events: the API, the settings and what it last applied."""

    kube: Kube
    config: OperatorConfig
    applied: dict[tuple[str, str, str], str] = field(default_factory=dict)
    """(kind, namespace, name) -> digest of the manifest last applied; an equal digest is not applied again."""
    readiness: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    """(namespace, server) -> (status, message) of the Ready condition last written: Deployment events that
    change nothing a user sees cost no API call."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards the dicts above and the two below."""
    namespace_locks: dict[str, threading.Lock] = field(default_factory=dict)
    server_locks: dict[tuple[str, str], threading.Lock] = field(default_factory=dict)

    # kopf runs these handlers on a pool of threads, so two events of one namespace reconcile at once. A reconcile
    # that read the policies or servers before another one must not write after it: its older view would stay.
    # So work that reads lists holds its namespace's lock and reads them inside it, and a server is rendered and
    # written under its own lock with lists read after the previous holder finished. Servers of one namespace
    # still reconcile in parallel.

    def namespace_lock(self, namespace: str) -> threading.Lock:
        with self.lock:
            return self.namespace_locks.setdefault(namespace, threading.Lock())

    def server_lock(self, namespace: str, name: str) -> threading.Lock:
        with self.lock:
            return self.server_locks.setdefault((namespace, name), threading.Lock())

    # --- MCPServer ---------------------------------------------------------------------------------------------

    def server_changed(self, server: Mapping[str, Any]) -> None:
        """An MCPServer was created, changed or found on start-up: reconcile it, then the policies' server lists."""
        meta = server["metadata"]
        with self.server_lock(meta["namespace"], meta["name"]):
            policies = self.policies(meta["namespace"])
            self.reconcile_server(server, policies)
        if policies:  # a policy created since lists this server itself: its own event re-reads the servers
            self.refresh_policy_statuses(meta["namespace"])

    def policies(self, namespace: str) -> list[PolicySource]:
        return [PolicySource.from_body(p) for p in self.kube.list("MCPToolPolicy", namespace)]

    def reconcile_server(self, server: Mapping[str, Any], policies: Iterable[PolicySource]) -> None:
        """Render one MCPServer, apply the manifests whose rendering changed, write its status.

        The caller holds the server's lock and read `policies` while holding it.
        """
        meta = server["metadata"]
        try:
            rendered = render_server(server, policies, self.config)
        except ValueError as exc:
            # The schema normally stops a bad spec at the apiserver; one that slips through is reported, not retried.
            error = str(exc)
            self.update_server_status(server, lambda s: _owned(server_status(s, None, None, now(), error=error)))
            return
        deployment = None
        try:
            for manifest in rendered.manifests:
                result = self.apply_if_changed(manifest)
                if manifest["kind"] == "Deployment":
                    deployment = result or self.kube.get("Deployment", meta["name"], meta["namespace"])
        except KubeError as exc:
            if not _namespace_terminating(exc):
                raise
            # The server goes with its namespace: nothing to create there any more, and nothing to retry.
            log.info("MCPServer %s/%s: its namespace is being deleted", meta["namespace"], meta["name"])
            return
        self.update_server_status(server, lambda s: _owned(server_status(s, rendered, deployment, now())))
        self.remember_ready(meta, ready_condition(deployment, None))

    def apply_if_changed(self, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
        """Server-side apply unless this exact manifest was the last one applied; returns the live object if applied."""
        key, value = _key(manifest), digest(manifest)
        with self.lock:
            if self.applied.get(key) == value:
                return None
        live = self.kube.apply(manifest)
        with self.lock:
            self.applied[key] = value
        return live

    def forget(self, namespace: str, name: str) -> None:
        """Drop what was applied for a deleted server, so a new one of the same name is applied afresh."""
        with self.lock:
            for key in [k for k in self.applied if k[1] == namespace and k[2] in (name, f"{name}-policy")]:
                del self.applied[key]
            self.readiness.pop((namespace, name), None)
            self.server_locks.pop((namespace, name), None)

    def update_server_status(self, server: Mapping[str, Any],
                             compute: Callable[[Mapping[str, Any]], dict[str, Any]]) -> None:
        """Write the status `compute` derives from the server, re-reading the server when another writer won."""
        meta = server["metadata"]
        for _ in range(CONFLICT_RETRIES):
            status = compute(server)
            current = server.get("status") or {}
            if all(current.get(k) == v for k, v in status.items()):
                return
            try:
                self.kube.patch_status("MCPServer", meta["name"], meta["namespace"], status,
                                       resource_version=server["metadata"].get("resourceVersion"))
                return
            except KubeError as exc:
                if exc.status != 409:
                    raise
            fresh = self.kube.get("MCPServer", meta["name"], meta["namespace"])
            if fresh is None or fresh["metadata"]["uid"] != meta.get("uid", fresh["metadata"]["uid"]):
                return
            server = fresh
        raise KubeError(409, f"status of MCPServer {meta['namespace']}/{meta['name']} kept changing under us")

    def owner_of(self, child: Mapping[str, Any]) -> dict[str, Any] | None:
        """The live MCPServer that owns `child`, unless it is gone or going."""
        meta = child["metadata"]
        owner = _owner_reference(child)
        if owner is None:
            return None
        server = self.kube.get("MCPServer", owner["name"], meta["namespace"])
        if server is None or server["metadata"]["uid"] != owner.get("uid"):
            return None
        if server["metadata"].get("deletionTimestamp"):
            return None
        return server

    def child_deleted(self, child: Mapping[str, Any]) -> None:
        """Someone deleted a child the operator manages: put it back, unless its MCPServer is going too."""
        with self.lock:
            self.applied.pop(_key(child), None)
        owner = _owner_reference(child)
        if owner is None:
            return
        namespace = child["metadata"]["namespace"]
        with self.server_lock(namespace, owner["name"]):
            server = self.owner_of(child)  # read inside the lock: the server may have changed while we waited
            if server is not None:
                self.reconcile_server(server, self.policies(namespace))

    def deployment_changed(self, deployment: Mapping[str, Any]) -> None:
        """A Deployment the operator owns changed: refresh its MCPServer's Ready condition."""
        meta = deployment["metadata"]
        seen = self.readiness.get((meta["namespace"], meta["name"]))
        ready = ready_condition(deployment, None)
        if seen == (ready["status"], ready["message"]):
            return
        server = self.owner_of(deployment)
        if server is None or not (server.get("status") or {}).get("conditions"):
            return  # not reconciled yet: the reconcile writes Ready along with the rest

        def with_ready(s: Mapping[str, Any]) -> dict[str, Any]:
            status = s.get("status") or {}
            ready = ready_condition(deployment, status.get("observedGeneration"))
            return {"conditions": set_condition(status.get("conditions") or [], ready, now())}

        self.update_server_status(server, with_ready)
        self.remember_ready(server["metadata"], ready)

    def remember_ready(self, meta: Mapping[str, Any], ready: Mapping[str, Any]) -> None:
        with self.lock:
            self.readiness[(meta["namespace"], meta["name"])] = (ready["status"], ready["message"])

    # --- MCPToolPolicy -------------------------------------------------------------------------------------------

    def reconcile_namespace(self, namespace: str) -> None:
        """After a policy changed: re-render every server of the namespace, then each policy's status.

        Policy events of one namespace run one after the other, each reading the lists afresh, so the last event's
        view of the policies is the one left applied.
        """
        with self.namespace_lock(namespace):
            bodies = self.kube.list("MCPToolPolicy", namespace)
            policies = [PolicySource.from_body(b) for b in bodies]
            servers = self.kube.list("MCPServer", namespace)
            for listed in servers:
                meta = listed["metadata"]
                with self.server_lock(namespace, meta["name"]):
                    # The listed body may predate a change a server handler applied while we waited: read it again.
                    server = self.kube.get("MCPServer", meta["name"], namespace)
                    if server is not None and not server["metadata"].get("deletionTimestamp"):
                        self.reconcile_server(server, policies)
            self.write_policy_statuses(namespace, bodies, policies, servers)

    def refresh_policy_statuses(self, namespace: str) -> None:
        """After a server came, changed or went: the policies' lists of servers."""
        with self.namespace_lock(namespace):
            bodies = self.kube.list("MCPToolPolicy", namespace)
            if bodies:  # a list of servers only where policies need it
                servers = self.kube.list("MCPServer", namespace)
                self.write_policy_statuses(namespace, bodies, [PolicySource.from_body(b) for b in bodies], servers)

    def write_policy_statuses(self, namespace: str, bodies: list[dict[str, Any]], policies: list[PolicySource],
                              servers: list[dict[str, Any]]) -> None:
        for body, policy in zip(bodies, policies):
            labels_of = [(s["metadata"]["name"], s["metadata"].get("labels") or {}) for s in servers]
            selected = [name for name, labels in labels_of if policy.selects(labels)]
            if not policy.valid:
                log.warning("MCPToolPolicy %s/%s is invalid: %s", namespace, policy.name, policy.error)
            status = policy_status(policy, body, selected, now())
            current = body.get("status") or {}
            if any(current.get(k) != v for k, v in status.items()):
                self.kube.patch_status("MCPToolPolicy", policy.name, namespace, status)
