"""The reconciler against an in-memory API: reconciles of one namespace that interleave, and what they cost.

The handlers are async and read the policies and servers from kopf's indexes, but a reconcile still awaits the API
between reading them and writing what it rendered. These tests hold one reconcile inside a write, with what it read
before in hand, while another runs on a newer view, and check what is written at the end. The index here is a
plain dict the test changes as kopf's watch streams would.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Awaitable, Callable

import kopf
import pytest
import yaml

from toolmesh.operator import handlers
from toolmesh.operator.kube import AsyncKube, KubeError
from toolmesh.operator.reconcile import Known, KnownPolicy, KnownServer, Reconciler
from toolmesh.operator.render import OperatorConfig

NAMESPACE = "team"
HOLD = 0.5
"""How long the held write waits for the other reconcile to finish: with correct ordering it never can."""


class MemoryKube:
    """The calls the reconciler makes, on dicts in memory; one call can be held at a gate (in its pool thread)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict] = {}
        self.version = 0
        self.lock = threading.Lock()
        self.gate: tuple[threading.Event, str, str] | None = None
        self.held = threading.Event()
        self.calls: list[tuple[str, str]] = []

    def arm(self, gate: threading.Event, method: str, kind: str) -> None:
        """Hold the next `method` call on `kind` until `gate` is set (or HOLD passes)."""
        self.gate = (gate, method, kind)

    def wait_at_gate(self, method: str, kind: str) -> None:
        with self.lock:
            self.calls.append((method, kind))
            gate, self.gate = (self.gate, None) if self.gate and self.gate[1:] == (method, kind) else (None, self.gate)
        if gate is not None:
            self.held.set()
            gate[0].wait(HOLD)

    def put(self, body: dict) -> dict:
        with self.lock:
            self.version += 1
            body = copy.deepcopy(body)
            body["metadata"].update(namespace=NAMESPACE, uid=f"uid-{body['metadata']['name']}",
                                    resourceVersion=str(self.version), generation=1)
            self.objects[(body["kind"], body["metadata"]["name"])] = body
            return copy.deepcopy(body)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        self.wait_at_gate("get", kind)
        with self.lock:
            found = self.objects.get((kind, name))
            return copy.deepcopy(found) if found else None

    def apply(self, manifest: dict) -> dict:
        self.wait_at_gate("apply", manifest["kind"])
        return self.put(manifest)

    def patch_status(self, kind: str, name: str, namespace: str, status: dict,
                     resource_version: str | None = None) -> dict | None:
        self.wait_at_gate("patch_status", kind)
        with self.lock:
            body = self.objects.get((kind, name))
            if body is None:
                return None
            merged = {**(body.get("status") or {}), **status}
            body["status"] = {k: v for k, v in merged.items() if v is not None}
            self.version += 1
            body["metadata"]["resourceVersion"] = str(self.version)
            return copy.deepcopy(body)

    def request(self, method: str, path: str, **_: object) -> dict:
        self.wait_at_gate("request", path)  # Events
        return {}


class Cluster:
    """The in-memory API with kopf's two indexes beside it, kept as the watch streams would keep them."""

    def __init__(self, kube: MemoryKube | None = None) -> None:
        self.kube = kube or MemoryKube()
        self.policies: dict[str, list[KnownPolicy]] = {NAMESPACE: []}
        self.servers: dict[str, list[KnownServer]] = {NAMESPACE: []}
        self.known = Known(policies=self.policies, servers=self.servers)
        self.reconciler = Reconciler(kube=AsyncKube(self.kube, workers=4), config=OperatorConfig())

    def add_server(self, name: str, labels: dict | None = None) -> dict:
        body = self.kube.put(server(name, labels))
        self.servers[NAMESPACE].append(KnownServer(name=name, labels=body["metadata"]["labels"]))
        return body

    def remove_server(self, name: str) -> None:
        del self.kube.objects[("MCPServer", name)]
        self.servers[NAMESPACE][:] = [s for s in self.servers[NAMESPACE] if s.name != name]

    def add_policy(self, name: str, ttl: int) -> dict:
        body = self.kube.put(policy(name, ttl))
        self.policies[NAMESPACE].append(KnownPolicy.from_body(body))
        return body

    def server(self, name: str) -> dict:
        return self.kube.get("MCPServer", name)


def server(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
            "metadata": {"name": name, "labels": labels or {"team": "a"}}, "spec": {"image": "example.org/mcp:1"}}


def policy(name: str, ttl: int) -> dict:
    return {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"team": "a"}}, "precedence": ttl, "cache": {"ttlSeconds": ttl}}}


async def race(kube: MemoryKube, first: Callable[[], Awaitable[object]], second: Callable[[], Awaitable[object]],
               method: str, kind: str) -> None:
    """Run `first` until its `method` call on `kind` is held, then `second` to the end, then let `first` go on."""
    gate = threading.Event()
    kube.arm(gate, method, kind)
    held = asyncio.create_task(first())
    assert await asyncio.to_thread(kube.held.wait, 10), f"the first reconcile never reached {method} {kind}"

    async def second_then_release() -> None:
        try:
            await second()
        finally:
            gate.set()

    await asyncio.wait_for(asyncio.gather(held, second_then_release()), 10)


def rendered_ttl(kube: MemoryKube, name: str) -> int:
    data = kube.get("ConfigMap", f"{name}-policy")["data"]["policy.yaml"]
    return yaml.safe_load(data)["spec"]["cache"]["ttlSeconds"]


async def test_two_policy_events_leave_the_newer_view_applied():
    cluster = Cluster()
    cluster.add_server("target")
    cluster.add_policy("low", 10)

    async def second():
        cluster.add_policy("high", 20)
        await cluster.reconciler.reconcile_namespace(NAMESPACE, cluster.known)

    # The first holds its ConfigMap write, rendered from "low" alone, while "high" arrives.
    await race(cluster.kube, lambda: cluster.reconciler.reconcile_namespace(NAMESPACE, cluster.known), second,
               "apply", "ConfigMap")
    status = cluster.server("target")["status"]
    assert sorted(status["appliedPolicies"]) == ["high", "low"], status
    assert rendered_ttl(cluster.kube, "target") == 20, "the higher-precedence policy wins in the ConfigMap"


async def test_a_server_event_does_not_undo_a_policy_event():
    cluster = Cluster()
    cluster.add_server("target")
    cluster.add_policy("low", 10)

    async def second():
        cluster.add_policy("high", 20)
        await cluster.reconciler.reconcile_namespace(NAMESPACE, cluster.known)

    await race(cluster.kube, lambda: cluster.reconciler.server_changed(cluster.server("target"), cluster.known),
               second, "apply", "ConfigMap")
    assert sorted(cluster.server("target")["status"]["appliedPolicies"]) == ["high", "low"]
    assert rendered_ttl(cluster.kube, "target") == 20
    high = cluster.kube.get("MCPToolPolicy", "high")["status"]
    assert high["servers"] == ["target"], high


async def test_policy_statuses_list_servers_created_at_once():
    cluster = Cluster()
    cluster.add_policy("low", 10)
    cluster.add_server("one")

    async def second():
        cluster.add_server("two")
        await cluster.reconciler.server_changed(cluster.server("two"), cluster.known)

    # The first holds its policy status write, listing "one" alone, while "two" is created.
    await race(cluster.kube, lambda: cluster.reconciler.server_changed(cluster.server("one"), cluster.known), second,
               "patch_status", "MCPToolPolicy")
    assert cluster.kube.get("MCPToolPolicy", "low")["status"]["servers"] == ["one", "two"]


async def test_a_policy_status_is_corrected_before_the_watch_shows_our_own_last_write():
    cluster = Cluster()
    cluster.add_policy("low", 10)
    cluster.add_server("one")
    await cluster.reconciler.server_changed(cluster.server("one"), cluster.known)
    # The index keeps the policy as the watch showed it after that first write: listing "one".
    cluster.policies[NAMESPACE][:] = [KnownPolicy.from_body(cluster.kube.get("MCPToolPolicy", "low"))]
    cluster.add_server("two")
    await cluster.reconciler.server_changed(cluster.server("two"), cluster.known)
    assert cluster.kube.get("MCPToolPolicy", "low")["status"]["servers"] == ["one", "two"]
    # "two" goes before the watch shows the write that listed it: the index still says ["one"], the API does not.
    cluster.remove_server("two")
    cluster.reconciler.forget(NAMESPACE, "two")
    await cluster.reconciler.refresh_policy_statuses(NAMESPACE, cluster.known)
    assert cluster.kube.get("MCPToolPolicy", "low")["status"]["servers"] == ["one"]


async def test_a_server_event_costs_the_same_whatever_the_number_of_servers():
    async def calls_for_one_event(others: int) -> list[tuple[str, str]]:
        cluster = Cluster()
        cluster.add_policy("low", 10)
        for i in range(others):
            cluster.add_server(f"other-{i:03d}")
        body = cluster.add_server("target")
        cluster.kube.calls.clear()
        await cluster.reconciler.server_changed(body, cluster.known)
        return sorted(cluster.kube.calls)

    alone = await calls_for_one_event(0)
    assert ("patch_status", "MCPToolPolicy") in alone, "the policy's list of servers is written"
    assert await calls_for_one_event(50) == alone


async def test_a_blocked_server_is_looked_at_again_until_it_can_be_reconciled():
    cluster = Cluster()
    cluster.reconciler.recheck_after = 0.01
    body = cluster.kube.put({**policy("auth", 1), "spec": {"selector": {}, "auth": {"issuers": [
        {"issuer": "internal-ci", "audiences": ["toolmesh"], "algorithms": ["HS256"],
         "secretRef": {"name": "jwt-signing", "key": "hmac"}}]}}})
    cluster.policies[NAMESPACE].append(KnownPolicy.from_body(body))
    blocked = await cluster.reconciler.server_changed(cluster.add_server("calc"), cluster.known)
    assert blocked is not None and blocked.reason == "MissingSecret"
    assert cluster.kube.get("ConfigMap", "calc-policy") is None
    cluster.kube.put({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "jwt-signing"},
                      "data": {"hmac": "czNjcjN0"}})
    deadline = asyncio.get_running_loop().time() + 10
    while cluster.kube.get("ConfigMap", "calc-policy") is None:
        assert asyncio.get_running_loop().time() < deadline, "the server was never looked at again"
        await asyncio.sleep(0.01)
    applied = {c["type"]: c for c in cluster.server("calc")["status"]["conditions"]}["PolicyApplied"]
    assert applied["status"] == "True", applied
    assert not cluster.reconciler.rechecks, "nothing left to look at"


class RefusingKube(MemoryKube):
    """An API that refuses every apply with `error`."""

    def __init__(self, error: KubeError) -> None:
        super().__init__()
        self.error = error

    def apply(self, manifest: dict) -> dict:
        raise self.error


async def test_a_server_whose_namespace_is_being_deleted_is_left_alone():
    cluster = Cluster(RefusingKube(KubeError(403, 'configmaps "s-policy" is forbidden: unable to create new content '
                                                  'in namespace team because it is being terminated')))
    await cluster.reconciler.server_changed(cluster.add_server("s"), cluster.known)
    assert "status" not in cluster.server("s"), "nothing written for a server that goes with its namespace"


async def test_any_other_refusal_is_a_temporary_error_kopf_retries():
    cluster = Cluster(RefusingKube(KubeError(403, 'configmaps is forbidden: User "system:serviceaccount:x:y" '
                                                  'cannot patch')))
    body = cluster.add_server("s")
    with pytest.raises(kopf.TemporaryError, match="cannot patch") as raised:
        await handlers.server_changed(body=kopf.Body(body), memo=kopf.Memo(reconciler=cluster.reconciler),
                                      known_policies=cluster.policies, known_servers=cluster.servers)
    assert raised.value.delay == 2


async def test_a_spec_that_cannot_be_rendered_is_a_permanent_error_and_said_in_the_status():
    cluster = Cluster()
    body = cluster.kube.put({**server("s"), "spec": {"image": "example.org/mcp:1", "port": "not a port"}})
    with pytest.raises(kopf.PermanentError, match="cannot be rendered"):
        await handlers.server_changed(body=kopf.Body(body), memo=kopf.Memo(reconciler=cluster.reconciler),
                                      known_policies=cluster.policies, known_servers=cluster.servers)
    applied = {c["type"]: c for c in cluster.server("s")["status"]["conditions"]}["PolicyApplied"]
    assert (applied["status"], applied["reason"]) == ("False", "InvalidSpec"), applied
