"""Makes the cluster match the renderers: applies what changed, and writes status on MCPServers and policies."""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from toolmesh.operator.events import EventRecorder
from toolmesh.operator.kube import CREATE_ONLY, Kube, KubeError
from toolmesh.operator.merge import PolicySource
from toolmesh.operator.render import (
    MissingSecret, OperatorConfig, RenderedServer, condition, digest, policy_status, ready_condition, render_server,
    secret_keys_of, server_status, set_condition,
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


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controller, from its ownerReferences; None when nothing controls it."""
    return next((o.get("uid") for o in obj["metadata"].get("ownerReferences") or [] if o.get("controller")), None)


class NameConflict(Exception):
    """A child the MCPServer needs exists and is not its own: toolmesh never adopts, changes or deletes it."""

    def __init__(self, kind: str, name: str, predecessor: bool):
        self.kind, self.name = kind, name
        self.predecessor = predecessor
        """The object belongs to an earlier MCPServer of the same name and goes with it: wait, do not alarm."""
        if predecessor:
            message = (f"{kind} {name} still belongs to an earlier MCPServer of this name; waiting for the garbage "
                       f"collector to delete it")
        else:
            message = (f"{kind} {name} already exists and was not created by this MCPServer, so toolmesh leaves it "
                       f"alone and runs nothing: delete or rename that {kind}, or give the MCPServer another name")
        super().__init__(message)


@dataclass
class Reconciler:
    """The operator's state across events: the API, the settings and what it last applied."""

    kube: Kube
    config: OperatorConfig
    applied: dict[tuple[str, str, str], str] = field(default_factory=dict)
    """(kind, namespace, name) -> digest of the manifest last applied; an equal digest is not applied again."""
    owned: dict[tuple[str, str, str], tuple[str, str]] = field(default_factory=dict)
    """(kind, namespace, name) -> (uid of the MCPServer, uid of the child) for a child this operator created or
    found controlled by that MCPServer. Every apply is pinned to the child's uid, so a child deleted and re-created
    by someone else is never written to."""
    events: EventRecorder | None = None
    """Posts Events on MCPServers and MCPToolPolicies for what a person must act on; made from `kube` if None."""
    recheck_after: float = 10.0
    """Seconds before a server blocked by a name conflict or a missing Secret is looked at again (the object in its
    way may go, the Secret may come, without any event we watch); doubled after each look that finds it still
    blocked, up to `recheck_max`."""
    recheck_max: float = 300.0
    """The longest wait between two looks at a blocked server."""
    rechecks: dict[tuple[str, str], tuple[threading.Timer | None, float]] = field(default_factory=dict)
    """(namespace, server) -> (pending look, its delay) for blocked servers."""
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

    def __post_init__(self) -> None:
        if self.events is None:
            self.events = EventRecorder(self.kube)

    def warn(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        assert self.events is not None
        self.events.post(obj, reason, message)

    # --- MCPServer ---------------------------------------------------------------------------------------------

    def server_changed(self, server: Mapping[str, Any]) -> str | None:
        """An MCPServer was created, changed or found on start-up: reconcile it, then the policies' server lists.

        Returns why the server is blocked ("NameConflict", "MissingSecret"), None when it was reconciled.
        """
        meta = server["metadata"]
        with self.server_lock(meta["namespace"], meta["name"]):
            policies = self.policies(meta["namespace"])
            blocked = self.reconcile_server(server, policies)
        if policies:  # a policy created since lists this server itself: its own event re-reads the servers
            self.refresh_policy_statuses(meta["namespace"])
        return blocked

    def policies(self, namespace: str) -> list[PolicySource]:
        return [PolicySource.from_body(p) for p in self.kube.list("MCPToolPolicy", namespace)]

    def reconcile_server(self, server: Mapping[str, Any], policies: Iterable[PolicySource]) -> str | None:
        """Render one MCPServer, apply the manifests whose rendering changed, write its status.

        Returns the reason the server is blocked ("NameConflict", "MissingSecret"), None when it was reconciled. The
        caller holds the server's lock and read `policies` while holding it.
        """
        meta = server["metadata"]
        try:
            rendered = render_server(server, policies, self.config, secret_keys=lambda name: secret_keys_of(
                self.kube.get("Secret", name, meta["namespace"])))
        except MissingSecret as exc:
            # Nothing is applied, so running pods keep their policy; the Secret may come later: look again then.
            self.report_unrendered(server, "MissingSecret", str(exc))
            self.schedule_recheck(meta["namespace"], meta["name"])
            return "MissingSecret"
        except ValueError as exc:
            # The schema normally stops a bad spec at the apiserver; one that slips through is reported, not retried.
            self.report_unrendered(server, "InvalidSpec", str(exc))
            return None
        deployment = None
        try:
            self.claim(server, rendered.manifests)
            for manifest in rendered.manifests:
                result = self.apply_if_changed(manifest, server)
                if manifest["kind"] == "Deployment":
                    deployment = result or self.kube.get("Deployment", meta["name"], meta["namespace"])
        except NameConflict as conflict:
            return self.refuse(server, rendered, conflict)
        except KubeError as exc:
            if not _namespace_terminating(exc):
                raise
            # The server goes with its namespace: nothing to create there any more, and nothing to retry.
            log.info("MCPServer %s/%s: its namespace is being deleted", meta["namespace"], meta["name"])
            return None
        self.update_server_status(server, lambda s: _owned(self.server_status(s, rendered, deployment)))
        self.remember_ready(meta, ready_condition(deployment, None))
        self.cancel_recheck(meta["namespace"], meta["name"])
        applied, reason, message = rendered.policy.describe()
        if not applied:
            self.warn(server, reason, message)
        return None

    def report_unrendered(self, server: Mapping[str, Any], reason: str, error: str) -> None:
        """The server could not be rendered: PolicyApplied=False with `reason` and `error`, and a Warning Event."""
        generation = server["metadata"].get("generation")

        def unrendered(s: Mapping[str, Any]) -> dict[str, Any]:
            status = server_status(s, None, None, now(), error=error)
            status["conditions"] = set_condition(status["conditions"], condition(
                "PolicyApplied", False, reason, error, generation), now())
            return _owned(status)

        self.update_server_status(server, unrendered)
        self.warn(server, reason, error)

    @staticmethod
    def server_status(server: Mapping[str, Any], rendered: RenderedServer,
                      deployment: Mapping[str, Any] | None) -> dict[str, Any]:
        """The renderer's status, with PolicyApplied as the merge describes it: which policy won which section, and
        every invalid policy meant for the server."""
        status = server_status(server, rendered, deployment, now())
        applied, reason, message = rendered.policy.describe()
        generation = server["metadata"].get("generation")
        status["conditions"] = set_condition(status["conditions"], condition(
            "PolicyApplied", applied, reason, message, generation), now())
        return status

    def refuse(self, server: Mapping[str, Any], rendered: RenderedServer, conflict: NameConflict) -> str | None:
        """A child's name is taken: say so on the server (and in an Event), publish no endpoint, touch nothing."""
        meta = server["metadata"]
        reason = "Progressing" if conflict.predecessor else "NameConflict"
        generation = meta.get("generation")

        def refused(s: Mapping[str, Any]) -> dict[str, Any]:
            conditions = list((s.get("status") or {}).get("conditions") or [])
            for cond in (condition("Ready", False, reason, str(conflict), generation),
                         condition("PolicyApplied", False, reason,
                                   "nothing is applied until the name conflict is resolved", generation)):
                conditions = set_condition(conditions, cond, now())
            return _owned({"observedGeneration": generation, "conditions": conditions})

        self.update_server_status(server, refused)
        self.remember_ready(meta, {"status": "False", "message": str(conflict)})
        self.schedule_recheck(meta["namespace"], meta["name"])
        if conflict.predecessor:
            return None
        log.warning("MCPServer %s/%s: %s", meta["namespace"], meta["name"], conflict)
        self.warn(server, "NameConflict", str(conflict))
        return "NameConflict"

    def claim(self, server: Mapping[str, Any], manifests: Iterable[Mapping[str, Any]]) -> None:
        """Check, before anything is written, that every child to apply is absent or controlled by this server.

        Raises NameConflict for the first that is not. A child whose uid is known from an earlier apply costs
        nothing; the others (first reconcile, after a restart) cost one GET each.
        """
        for manifest in manifests:
            key = _key(manifest)
            with self.lock:
                if self.applied.get(key) == digest(manifest) or self.owned_child(key, server):
                    continue
            self.check_owner(manifest, server)

    def owned_child(self, key: tuple[str, str, str], server: Mapping[str, Any]) -> str | None:
        """The uid of the child `key` if it is known to be `server`'s (the caller holds the lock)."""
        server_uid, child_uid = self.owned.get(key, ("", ""))
        return child_uid if server_uid == server["metadata"]["uid"] else None

    def check_owner(self, manifest: Mapping[str, Any], server: Mapping[str, Any]) -> None:
        """Read the child: absent is fine, controlled by this server is remembered as ours, anything else refused."""
        meta, key = manifest["metadata"], _key(manifest)
        live = self.kube.get(manifest["kind"], meta["name"], meta.get("namespace"))
        if live is None:
            with self.lock:
                self.owned.pop(key, None)
            return
        uid = controller_uid(live)
        if uid != server["metadata"]["uid"]:
            owner = _owner_reference(live)
            predecessor = (uid is not None and owner is not None and owner.get("uid") == uid
                           and owner.get("name") == server["metadata"]["name"])
            raise NameConflict(manifest["kind"], meta["name"], predecessor)
        with self.lock:
            self.owned[key] = (server["metadata"]["uid"], live["metadata"]["uid"])

    def apply_if_changed(self, manifest: Mapping[str, Any], server: Mapping[str, Any]) -> dict[str, Any] | None:
        """Apply unless this exact manifest was the last one applied; returns the live object if applied.

        The apply is pinned to the child this server owns (its uid), or, for a child that does not exist, may only
        create it: what someone else created in between is never written to, whatever its fields.
        """
        key, value = _key(manifest), digest(manifest)
        with self.lock:
            if self.applied.get(key) == value:
                return None
        for attempt in range(2):
            with self.lock:
                uid = self.owned_child(key, server)
            pinned = {**manifest, "metadata": {**manifest["metadata"],
                                               **({"uid": uid} if uid else {"resourceVersion": CREATE_ONLY})}}
            try:
                live = self.kube.apply(pinned)
                break
            except KubeError as exc:
                # 409: created meanwhile, or the pinned child is gone; 422: uid immutable, so it was replaced.
                if exc.status not in (409, 422) or attempt:
                    raise
            with self.lock:
                self.owned.pop(key, None)
            self.check_owner(manifest, server)
        with self.lock:
            self.applied[key] = value
            self.owned[key] = (server["metadata"]["uid"], live["metadata"]["uid"])
        return live

    def schedule_recheck(self, namespace: str, name: str) -> None:
        """Look at a blocked server again later, each time waiting twice as long: never a hot loop."""
        with self.lock:
            timer, delay = self.rechecks.get((namespace, name), (None, 0.0))
            if timer is not None:
                return
            delay = min(self.recheck_max, delay * 2 or self.recheck_after)
            timer = threading.Timer(delay, self.recheck, (namespace, name))
            timer.daemon = True
            self.rechecks[(namespace, name)] = (timer, delay)
        timer.start()

    def cancel_recheck(self, namespace: str, name: str) -> None:
        with self.lock:
            timer, _ = self.rechecks.pop((namespace, name), (None, 0.0))
        if timer is not None:
            timer.cancel()

    def recheck(self, namespace: str, name: str) -> None:
        with self.lock:
            _, delay = self.rechecks.get((namespace, name), (None, 0.0))
            self.rechecks[(namespace, name)] = (None, delay)
        try:
            server = self.kube.get("MCPServer", name, namespace)
            if server is None or server["metadata"].get("deletionTimestamp"):
                self.cancel_recheck(namespace, name)
                return
            self.server_changed(server)  # schedules the next look if still blocked
        except Exception as exc:  # noqa: BLE001 - a timer thread has no one to raise to; look again later
            log.warning("looking again at MCPServer %s/%s failed: %s", namespace, name, exc)
            self.schedule_recheck(namespace, name)

    def forget(self, namespace: str, name: str) -> None:
        """Drop what was applied for a deleted server, so a new one of the same name is applied afresh."""
        self.cancel_recheck(namespace, name)
        with self.lock:
            for known in (self.applied, self.owned):
                for key in [k for k in known if k[1] == namespace and k[2] in (name, f"{name}-policy")]:
                    del known[key]
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
            self.owned.pop(_key(child), None)
        owner = _owner_reference(child)
        if owner is None:
            return
        namespace = child["metadata"]["namespace"]
        with self.server_lock(namespace, owner["name"]):
            # Read inside the lock: the server may have changed while we waited. Looked up by name, not uid: a
            # server re-created under the same name waits for its predecessor's children to go.
            server = self.kube.get("MCPServer", owner["name"], namespace)
            if server is not None and not server["metadata"].get("deletionTimestamp"):
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
        if any(c.get("type") == "Ready" and c.get("reason") == "NameConflict" for c in server["status"]["conditions"]):
            return  # the conflict is what a person must see, whatever the Deployment does

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
        labels_of = [(s["metadata"]["name"], s["metadata"].get("labels") or {}) for s in servers]
        for body, policy in zip(bodies, policies):
            selected = [name for name, labels in labels_of if policy.selects(labels)]
            status = self.policy_status(policy, body, selected)
            if not policy.valid:
                log.warning("MCPToolPolicy %s/%s: %s", namespace, policy.name, policy.invalid_reason())
                self.warn(body, "InvalidPolicy", policy.invalid_reason())
            current = body.get("status") or {}
            if any(current.get(k) != v for k, v in status.items()):
                self.kube.patch_status("MCPToolPolicy", policy.name, namespace, status)

    @staticmethod
    def policy_status(policy: PolicySource, body: Mapping[str, Any], selected: list[str]) -> dict[str, Any]:
        """Accepted, where the spec in force applies, and — for a valid spec — the spec kept as the last accepted."""
        status = policy_status(policy, body, selected, now())
        if policy.valid:
            status.update(acceptedGeneration=policy.generation, acceptedSpec=dict(policy.spec))
            return status
        names = sorted(selected)
        where = (f"it stays in force on {len(names)} MCPServer(s)" if policy.accepted is not None
                 else "none applies anywhere")
        accepted = condition("Accepted", False, "InvalidSpec", f"{policy.invalid_reason()} ({where})",
                             policy.generation)
        current = (body.get("status") or {}).get("conditions") or []
        status.update(conditions=set_condition(current, accepted, now()), servers=names, serverCount=len(names))
        return status
