"""Makes the cluster match the renderers: applies what changed, and writes status on MCPServers and policies."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from toolmesh.operator.events import EventRecorder
from toolmesh.operator.kube import CREATE_ONLY, AsyncKube, KubeError
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


@dataclass(frozen=True)
class KnownPolicy:
    """An MCPToolPolicy as the operator's index keeps it: parsed once per change, with the body its status is
    written from."""

    source: PolicySource
    """The policy as the merge reads it."""
    body: Mapping[str, Any]
    """The object as last seen on the watch stream."""

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> KnownPolicy:
        return cls(source=PolicySource.from_body(body), body=body)


@dataclass(frozen=True)
class KnownServer:
    """An MCPServer as the operator's index keeps it: what the policies' server lists need."""

    name: str
    """metadata.name."""
    labels: Mapping[str, str]
    """metadata.labels, which policy selectors match."""


@dataclass(frozen=True)
class Known:
    """The policies and servers of every namespace served, as the watch streams last showed them.

    kopf keeps both indexes current (namespace -> objects) before it runs a handler for the event that changed
    them, so a reconcile reads the latest view without asking the API, whatever the number of objects.
    """

    policies: Mapping[str, Iterable[KnownPolicy]]
    """namespace -> its MCPToolPolicies."""
    servers: Mapping[str, Iterable[KnownServer]]
    """namespace -> its MCPServers."""

    def policies_in(self, namespace: str) -> list[KnownPolicy]:
        return sorted(self.policies.get(namespace) or (), key=lambda p: p.source.name)

    def servers_in(self, namespace: str) -> list[KnownServer]:
        return sorted(self.servers.get(namespace) or (), key=lambda s: s.name)


@dataclass(frozen=True)
class Blocked:
    """Why a server was not reconciled, for the handler to report: nothing it was asked to do is applied."""

    reason: str
    """NameConflict, MissingSecret (looked at again later) or InvalidSpec (waits for the next edit)."""
    message: str
    """What a person reads in the server's status."""


@dataclass
class Reconciler:
    """The operator's state across events: the API, the settings and what it last applied.

    Everything runs on kopf's event loop; only the API requests leave it, for `kube`'s threads. A reconcile still
    awaits between reading the policies and writing what it rendered from them, so two must not interleave on one
    server: a server is rendered and written under its own asyncio lock, reading the policies inside it, and the
    policies' statuses of a namespace likewise under the namespace's. Whoever comes later reads a later view and
    writes last. Servers of one namespace reconcile side by side.
    """

    kube: AsyncKube
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
    way may go, the Secret may come, without any event we watch), or before work a watch event asked for and the
    API refused is tried again; doubled after each look that finds it still blocked or failing, up to
    `recheck_max`."""
    recheck_max: float = 300.0
    """The longest wait between two looks."""
    rechecks: dict[tuple[str, ...], tuple[asyncio.TimerHandle | None, float]] = field(default_factory=dict)
    """("MCPServer", namespace, name) or ("MCPToolPolicy", namespace) -> (pending look, its delay)."""
    readiness: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    """(namespace, server) -> (status, message) of the Ready condition last written: Deployment events that
    change nothing a user sees cost no API call."""
    policy_statuses: dict[tuple[str, str], tuple[str, dict[str, Any]]] = field(default_factory=dict)
    """(namespace, policy) -> (uid, status) last written: the watch stream may not have shown our own write yet,
    and only the operator writes a policy's status."""
    server_locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    namespace_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    looks: set[asyncio.Task[None]] = field(default_factory=set)
    """Looks in progress (the loop keeps only weak references to tasks)."""

    def __post_init__(self) -> None:
        if self.events is None:
            self.events = EventRecorder(self.kube.sync)

    def server_lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self.server_locks.setdefault((namespace, name), asyncio.Lock())

    def namespace_lock(self, namespace: str) -> asyncio.Lock:
        return self.namespace_locks.setdefault(namespace, asyncio.Lock())

    async def warn(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        assert self.events is not None
        await self.kube.run(self.events.post, obj, reason, message)

    # --- MCPServer ---------------------------------------------------------------------------------------------

    async def server_changed(self, server: Mapping[str, Any], known: Known) -> Blocked | None:
        """An MCPServer was created, changed or found on start-up: reconcile it, then the policies' server lists.

        Returns why the server is blocked, None when it was reconciled.
        """
        meta = server["metadata"]
        async with self.server_lock(meta["namespace"], meta["name"]):
            blocked = await self.reconcile_server(server, known)
        if known.policies_in(meta["namespace"]):  # a list of servers only where policies need it
            await self.refresh_policy_statuses(meta["namespace"], known)
        return blocked

    async def reconcile_named(self, namespace: str, name: str, known: Known) -> Blocked | None:
        """Reconcile the server of that name as it is now, unless it is gone or going."""
        async with self.server_lock(namespace, name):
            # Read inside the lock: the server may have changed while we waited. Looked up by name, not uid: a
            # server re-created under the same name waits for its predecessor's children to go.
            server = await self.kube.get("MCPServer", name, namespace)
            if server is None or server["metadata"].get("deletionTimestamp"):
                self.cancel_recheck(namespace, name)
                return None
            return await self.reconcile_server(server, known)

    async def reconcile_server(self, server: Mapping[str, Any], known: Known) -> Blocked | None:
        """Render one MCPServer, apply the manifests whose rendering changed, write its status.

        The caller holds the server's lock; the policies are read from `known` here, inside it. Returns why the
        server is blocked, None when it was reconciled.
        """
        meta = server["metadata"]
        namespace = meta["namespace"]
        policies = [p.source for p in known.policies_in(namespace)]

        def secret_keys(name: str) -> set[str] | None:
            return secret_keys_of(self.kube.sync.get("Secret", name, namespace))  # in the pool's thread

        try:
            rendered = await self.kube.run(render_server, server, policies, self.config, secret_keys=secret_keys)
        except MissingSecret as exc:
            # Nothing is applied, so running pods keep their policy; the Secret may come later: look again then.
            await self.report_unrendered(server, "MissingSecret", str(exc))
            self.look_again(namespace, meta["name"], known)
            return Blocked("MissingSecret", str(exc))
        except ValueError as exc:
            # The schema normally stops a bad spec at the apiserver; one that slips through is reported, not retried.
            await self.report_unrendered(server, "InvalidSpec", str(exc))
            return Blocked("InvalidSpec", str(exc))
        deployment = None
        try:
            await self.claim(server, rendered.manifests)
            for manifest in rendered.manifests:
                result = await self.apply_if_changed(manifest, server)
                if manifest["kind"] == "Deployment":
                    deployment = result or await self.kube.get("Deployment", meta["name"], namespace)
        except NameConflict as conflict:
            return await self.refuse(server, conflict, known)
        except KubeError as exc:
            if not _namespace_terminating(exc):
                raise
            # The server goes with its namespace: nothing to create there any more, and nothing to retry.
            log.info("MCPServer %s/%s: its namespace is being deleted", namespace, meta["name"])
            return None
        await self.update_server_status(server, lambda s: _owned(self.server_status(s, rendered, deployment)))
        self.remember_ready(meta, ready_condition(deployment, None))
        self.cancel_recheck(namespace, meta["name"])
        applied, reason, message = rendered.policy.describe()
        if not applied:
            await self.warn(server, reason, message)
        return None

    async def report_unrendered(self, server: Mapping[str, Any], reason: str, error: str) -> None:
        """The server could not be rendered: PolicyApplied=False with `reason` and `error`, and a Warning Event."""
        generation = server["metadata"].get("generation")

        def unrendered(s: Mapping[str, Any]) -> dict[str, Any]:
            status = server_status(s, None, None, now(), error=error)
            status["conditions"] = set_condition(status["conditions"], condition(
                "PolicyApplied", False, reason, error, generation), now())
            return _owned(status)

        await self.update_server_status(server, unrendered)
        await self.warn(server, reason, error)

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


    async def refuse(self, server: Mapping[str, Any], conflict: NameConflict, known: Known) -> Blocked | None:
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

        await self.update_server_status(server, refused)
        self.remember_ready(meta, {"status": "False", "message": str(conflict)})
        self.look_again(meta["namespace"], meta["name"], known)
        if conflict.predecessor:
            return None
        log.warning("MCPServer %s/%s: %s", meta["namespace"], meta["name"], conflict)
        await self.warn(server, "NameConflict", str(conflict))
        return Blocked("NameConflict", str(conflict))

    async def claim(self, server: Mapping[str, Any], manifests: Iterable[Mapping[str, Any]]) -> None:
        """Check, before anything is written, that every child to apply is absent or controlled by this server.

        Raises NameConflict for the first that is not. A child whose uid is known from an earlier apply costs
        nothing; the others (first reconcile, after a restart) cost one GET each.
        """
        for manifest in manifests:
            key = _key(manifest)
            if self.applied.get(key) == digest(manifest) or self.owned_child(key, server):
                continue
            await self.check_owner(manifest, server)

    def owned_child(self, key: tuple[str, str, str], server: Mapping[str, Any]) -> str | None:
        """The uid of the child `key` if it is known to be `server`'s."""
        server_uid, child_uid = self.owned.get(key, ("", ""))
        return child_uid if server_uid == server["metadata"]["uid"] else None

    async def check_owner(self, manifest: Mapping[str, Any], server: Mapping[str, Any]) -> None:
        """Read the child: absent is fine, controlled by this server is remembered as ours, anything else refused."""
        meta, key = manifest["metadata"], _key(manifest)
        live = await self.kube.get(manifest["kind"], meta["name"], meta.get("namespace"))
        if live is None:
            self.owned.pop(key, None)
            return
        uid = controller_uid(live)
        if uid != server["metadata"]["uid"]:
            owner = _owner_reference(live)
            predecessor = (uid is not None and owner is not None and owner.get("uid") == uid
                           and owner.get("name") == server["metadata"]["name"])
            raise NameConflict(manifest["kind"], meta["name"], predecessor)
        self.owned[key] = (server["metadata"]["uid"], live["metadata"]["uid"])

    async def apply_if_changed(self, manifest: Mapping[str, Any], server: Mapping[str, Any]) -> dict[str, Any] | None:
        """Apply unless this exact manifest was the last one applied; returns the live object if applied.

        The apply is pinned to the child this server owns (its uid), or, for a child that does not exist, may only
        create it: what someone else created in between is never written to, whatever its fields.
        """
        key, value = _key(manifest), digest(manifest)
        if self.applied.get(key) == value:
            return None
        for attempt in range(2):
            uid = self.owned_child(key, server)
            pinned = {**manifest, "metadata": {**manifest["metadata"],
                                               **({"uid": uid} if uid else {"resourceVersion": CREATE_ONLY})}}
            try:
                live = await self.kube.apply(pinned)
                break
            except KubeError as exc:
                # 409: created meanwhile, or the pinned child is gone; 422: uid immutable, so it was replaced.
                if exc.status not in (409, 422) or attempt:
                    raise
            self.owned.pop(key, None)
            await self.check_owner(manifest, server)
        self.applied[key] = value
        self.owned[key] = (server["metadata"]["uid"], live["metadata"]["uid"])
        return live

    # --- looking again -------------------------------------------------------------------------------------------

    def look_again(self, namespace: str, name: str, known: Known) -> None:
        """Reconcile a blocked server, or one a watch event could not reconcile, again later."""
        self.later(("MCPServer", namespace, name), lambda: self.recheck(namespace, name, known))

    def later(self, key: tuple[str, ...], work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` after the delay for `key`, twice as long as the last one: never a hot loop.

        kopf retries its change handlers, not its event handlers nor a server blocked by what it does not watch;
        this is that retry. `work` that raises is logged and tried again; work that succeeds calls `settle(key)`.
        """
        handle, delay = self.rechecks.get(key, (None, 0.0))
        if handle is not None:
            return
        delay = min(self.recheck_max, delay * 2 or self.recheck_after)
        handle = asyncio.get_running_loop().call_later(delay, self.start_look, key, work)
        self.rechecks[key] = (handle, delay)

    def start_look(self, key: tuple[str, ...], work: Callable[[], Awaitable[None]]) -> None:
        _, delay = self.rechecks.get(key, (None, 0.0))
        self.rechecks[key] = (None, delay)
        task = asyncio.get_running_loop().create_task(self.look(key, work))
        self.looks.add(task)
        task.add_done_callback(self.looks.discard)

    async def look(self, key: tuple[str, ...], work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        except Exception as exc:  # noqa: BLE001 - no handler waits for this look: it is retried, and said
            log.warning("%s: failed again, trying later: %s", " ".join(key), exc)
            self.later(key, work)

    def settle(self, key: tuple[str, ...]) -> None:
        """`key` needs no further look: drop its pending one and its delay."""
        handle, _ = self.rechecks.pop(key, (None, 0.0))
        if handle is not None:
            handle.cancel()

    def cancel_recheck(self, namespace: str, name: str) -> None:
        self.settle(("MCPServer", namespace, name))

    async def recheck(self, namespace: str, name: str, known: Known) -> None:
        if await self.reconcile_named(namespace, name, known) is None:  # a blocked server schedules its next look
            if known.policies_in(namespace):
                await self.refresh_policy_statuses(namespace, known)

    def forget(self, namespace: str, name: str) -> None:
        """Drop what was applied for a deleted server, so a new one of the same name is applied afresh."""
        self.cancel_recheck(namespace, name)
        for known in (self.applied, self.owned):
            for key in [k for k in known if k[1] == namespace and k[2] in (name, f"{name}-policy")]:
                del known[key]
        self.readiness.pop((namespace, name), None)
        self.server_locks.pop((namespace, name), None)

    async def update_server_status(self, server: Mapping[str, Any],
                                   compute: Callable[[Mapping[str, Any]], dict[str, Any]]) -> None:
        """Write the status `compute` derives from the server, re-reading the server when another writer won."""
        meta = server["metadata"]
        for _ in range(CONFLICT_RETRIES):
            status = compute(server)
            current = server.get("status") or {}
            if all(current.get(k) == v for k, v in status.items()):
                return
            try:
                await self.kube.patch_status("MCPServer", meta["name"], meta["namespace"], status,
                                             resource_version=server["metadata"].get("resourceVersion"))
                return
            except KubeError as exc:
                if exc.status != 409:
                    raise
            fresh = await self.kube.get("MCPServer", meta["name"], meta["namespace"])
            if fresh is None or fresh["metadata"]["uid"] != meta.get("uid", fresh["metadata"]["uid"]):
                return
            server = fresh
        raise KubeError(409, f"status of MCPServer {meta['namespace']}/{meta['name']} kept changing under us")

    async def owner_of(self, child: Mapping[str, Any]) -> dict[str, Any] | None:
        """The live MCPServer that owns `child`, unless it is gone or going."""
        meta = child["metadata"]
        owner = _owner_reference(child)
        if owner is None:
            return None
        server = await self.kube.get("MCPServer", owner["name"], meta["namespace"])
        if server is None or server["metadata"]["uid"] != owner.get("uid"):
            return None
        if server["metadata"].get("deletionTimestamp"):
            return None
        return server

    async def child_deleted(self, child: Mapping[str, Any], known: Known) -> None:
        """Someone deleted a child the operator manages: put it back, unless its MCPServer is going too."""
        self.applied.pop(_key(child), None)
        self.owned.pop(_key(child), None)
        owner = _owner_reference(child)
        if owner is not None:
            await self.reconcile_named(child["metadata"]["namespace"], owner["name"], known)

    async def deployment_changed(self, deployment: Mapping[str, Any]) -> None:
        """A Deployment the operator owns changed: refresh its MCPServer's Ready condition."""
        meta = deployment["metadata"]
        seen = self.readiness.get((meta["namespace"], meta["name"]))
        ready = ready_condition(deployment, None)
        if seen == (ready["status"], ready["message"]):
            return
        server = await self.owner_of(deployment)
        if server is None or not (server.get("status") or {}).get("conditions"):
            return  # not reconciled yet: the reconcile writes Ready along with the rest
        if any(c.get("type") == "Ready" and c.get("reason") == "NameConflict" for c in server["status"]["conditions"]):
            return  # the conflict is what a person must see, whatever the Deployment does

        def with_ready(s: Mapping[str, Any]) -> dict[str, Any]:
            status = s.get("status") or {}
            ready = ready_condition(deployment, status.get("observedGeneration"))
            return {"conditions": set_condition(status.get("conditions") or [], ready, now())}

        await self.update_server_status(server, with_ready)
        self.remember_ready(server["metadata"], ready)

    def remember_ready(self, meta: Mapping[str, Any], ready: Mapping[str, Any]) -> None:
        self.readiness[(meta["namespace"], meta["name"])] = (ready["status"], ready["message"])

    # --- MCPToolPolicy -------------------------------------------------------------------------------------------

    async def reconcile_namespace(self, namespace: str, known: Known) -> None:
        """After a policy changed: re-render every server of the namespace, then each policy's status.

        Each server reads the policies when its turn comes, so whichever policy event comes last, its view is the
        one left applied. A server the API refuses is logged and looked at again; the others go on.
        """
        names = [s.name for s in known.servers_in(namespace)]
        outcomes = await asyncio.gather(*(self.reconcile_named(namespace, name, known) for name in names),
                                        return_exceptions=True)
        for name, outcome in zip(names, outcomes):
            if isinstance(outcome, Exception):
                log.warning("MCPServer %s/%s: re-rendering after a policy change failed, trying later: %s",
                            namespace, name, outcome)
                self.look_again(namespace, name, known)
            elif isinstance(outcome, BaseException):
                raise outcome
        await self.refresh_policy_statuses(namespace, known)

    async def refresh_policy_statuses(self, namespace: str, known: Known) -> None:
        """After a server or policy came, changed or went: the policies' statuses and lists of servers."""
        async with self.namespace_lock(namespace):
            # Read inside the lock: a refresh that waited reads the view the one before it could not have seen.
            servers = [(s.name, s.labels) for s in known.servers_in(namespace)]
            for policy in known.policies_in(namespace):
                await self.write_policy_status(namespace, policy, servers)

    def refresh_policy_statuses_later(self, namespace: str, known: Known) -> None:
        """The policies' statuses could not be written from a watch event: try again later."""
        key = ("MCPToolPolicy", namespace)

        async def refresh() -> None:
            await self.refresh_policy_statuses(namespace, known)
            self.settle(key)

        self.later(key, refresh)

    async def write_policy_status(self, namespace: str, known: KnownPolicy,
                                  servers: list[tuple[str, Mapping[str, str]]]) -> None:
        policy, body = known.source, known.body
        uid = body["metadata"].get("uid", "")
        written_uid, written = self.policy_statuses.get((namespace, policy.name), ("", None))
        if written is not None and written_uid == uid:
            body = {**body, "status": written}  # our last write, which the watch stream may not have shown yet
        selected = [name for name, labels in servers if policy.selects(labels)]
        status = self.policy_status(policy, body, selected)
        if not policy.valid:
            log.warning("MCPToolPolicy %s/%s: %s", namespace, policy.name, policy.invalid_reason())
            await self.warn(body, "InvalidPolicy", policy.invalid_reason())
        current = body.get("status") or {}
        if all(current.get(k) == v for k, v in status.items()):
            return
        live = await self.kube.patch_status("MCPToolPolicy", policy.name, namespace, status)
        if live is not None and live["metadata"].get("uid") == uid:
            self.policy_statuses[(namespace, policy.name)] = (uid, dict(live.get("status") or {}))

    def policy_deleted(self, namespace: str, name: str) -> None:
        self.policy_statuses.pop((namespace, name), None)

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
