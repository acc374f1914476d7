"""The reconciler against an in-memory API: concurrent reconciles of one namespace, and a namespace going away.

kopf runs handlers on a thread pool, so policy events of one namespace reconcile at once. These tests hold one
reconcile inside its read of the policies while another runs, the interleaving that left a server with an old
policy list in the cluster tests, and check what is written at the end.
"""

from __future__ import annotations

import copy
import threading

import pytest
import yaml

from toolmesh.operator.kube import KubeError
from toolmesh.operator.reconcile import Reconciler
from toolmesh.operator.render import OperatorConfig

NAMESPACE = "team"
HOLD = 0.5
"""How long the held reconcile waits for the other one to finish: with correct locking it never can."""


class MemoryKube:
    """The calls the reconciler makes, on dicts in memory; one list read can be held at a gate."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict] = {}
        self.version = 0
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None
        self.gate_kind = "MCPToolPolicy"
        self.held = threading.Event()

    def put(self, body: dict) -> None:
        with self.lock:
            self.version += 1
            body = copy.deepcopy(body)
            body["metadata"].update(namespace=NAMESPACE, uid=f"uid-{body['metadata']['name']}",
                                    resourceVersion=str(self.version), generation=1)
            self.objects[(body["kind"], body["metadata"]["name"])] = body

    def list(self, kind: str, namespace: str | None = None) -> list[dict]:
        with self.lock:
            items = [copy.deepcopy(o) for (k, _), o in sorted(self.objects.items()) if k == kind]
        gate, self.gate = (self.gate, None) if kind == self.gate_kind else (None, self.gate)
        if gate is not None:  # the first read of that kind after arming: hold it with the old list in hand
            self.held.set()
            gate.wait(HOLD)
        return items

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        with self.lock:
            found = self.objects.get((kind, name))
            return copy.deepcopy(found) if found else None

    def apply(self, manifest: dict) -> dict:
        self.put(manifest)
        return self.get(manifest["kind"], manifest["metadata"]["name"])

    def patch_status(self, kind: str, name: str, namespace: str, status: dict,
                     resource_version: str | None = None) -> dict | None:
        with self.lock:
            body = self.objects.get((kind, name))
            if body is None:
                return None
            merged = {**(body.get("status") or {}), **status}
            body["status"] = {k: v for k, v in merged.items() if v is not None}
            self.version += 1
            body["metadata"]["resourceVersion"] = str(self.version)
            return copy.deepcopy(body)


def server(name: str) -> dict:
    return {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
            "metadata": {"name": name, "labels": {"team": "a"}}, "spec": {"image": "example.org/mcp:1"}}


def policy(name: str, ttl: int) -> dict:
    return {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"team": "a"}}, "precedence": ttl, "cache": {"ttlSeconds": ttl}}}


def race(kube: MemoryKube, first, second, kind: str = "MCPToolPolicy") -> None:
    """Run `first` until it holds its list of `kind`, then `second` to the end, then let `first` go on."""
    gate = threading.Event()
    kube.gate, kube.gate_kind = gate, kind
    held = threading.Thread(target=first)
    held.start()
    assert kube.held.wait(10), f"the first reconcile never listed {kind}"
    other = threading.Thread(target=lambda: (second(), gate.set()))
    other.start()
    held.join(10)
    other.join(10)
    assert not held.is_alive() and not other.is_alive(), "a reconcile hung"


def rendered_ttl(kube: MemoryKube, name: str) -> int:
    data = kube.get("ConfigMap", f"{name}-policy")["data"]["policy.yaml"]
    return yaml.safe_load(data)["spec"]["cache"]["ttlSeconds"]


def test_two_policy_events_leave_the_newer_list_applied():
    kube = MemoryKube()
    reconciler = Reconciler(kube=kube, config=OperatorConfig())
    kube.put(server("target"))
    kube.put(policy("low", 10))
    reconciler.reconcile_namespace(NAMESPACE)
    assert rendered_ttl(kube, "target") == 10

    def second():
        kube.put(policy("high", 20))
        reconciler.reconcile_namespace(NAMESPACE)

    race(kube, lambda: reconciler.reconcile_namespace(NAMESPACE), second)
    status = kube.get("MCPServer", "target")["status"]
    assert sorted(status["appliedPolicies"]) == ["high", "low"], status
    assert rendered_ttl(kube, "target") == 20, "the higher-precedence policy wins in the ConfigMap"


def test_a_server_event_does_not_undo_a_policy_event():
    kube = MemoryKube()
    reconciler = Reconciler(kube=kube, config=OperatorConfig())
    kube.put(server("target"))
    kube.put(policy("low", 10))
    reconciler.server_changed(kube.get("MCPServer", "target"))

    def second():
        kube.put(policy("high", 20))
        reconciler.reconcile_namespace(NAMESPACE)

    race(kube, lambda: reconciler.server_changed(kube.get("MCPServer", "target")), second)
    assert sorted(kube.get("MCPServer", "target")["status"]["appliedPolicies"]) == ["high", "low"]
    assert rendered_ttl(kube, "target") == 20
    high = kube.get("MCPToolPolicy", "high")["status"]
    assert high["servers"] == ["target"], high


def test_policy_statuses_list_servers_created_at_once():
    kube = MemoryKube()
    reconciler = Reconciler(kube=kube, config=OperatorConfig())
    kube.put(policy("low", 10))
    kube.put(server("one"))

    def second():
        kube.put(server("two"))
        reconciler.server_changed(kube.get("MCPServer", "two"))

    race(kube, lambda: reconciler.server_changed(kube.get("MCPServer", "one")), second, kind="MCPServer")
    assert kube.get("MCPToolPolicy", "low")["status"]["servers"] == ["one", "two"]


class RefusingKube(MemoryKube):
    """An API that refuses every apply with `error`."""

    def __init__(self, error: KubeError) -> None:
        super().__init__()
        self.error = error

    def apply(self, manifest: dict) -> dict:
        raise self.error


def test_a_server_whose_namespace_is_being_deleted_is_left_alone():
    kube = RefusingKube(KubeError(403, 'configmaps "s-policy" is forbidden: unable to create new content in '
                                       'namespace team because it is being terminated'))
    kube.put(server("s"))
    Reconciler(kube=kube, config=OperatorConfig()).server_changed(kube.get("MCPServer", "s"))
    assert "status" not in kube.get("MCPServer", "s"), "nothing written for a server that goes with its namespace"


def test_any_other_refusal_still_fails_the_reconcile_so_kopf_retries_it():
    kube = RefusingKube(KubeError(403, 'configmaps is forbidden: User "system:serviceaccount:x:y" cannot patch'))
    kube.put(server("s"))
    with pytest.raises(KubeError, match="cannot patch"):
        Reconciler(kube=kube, config=OperatorConfig()).server_changed(kube.get("MCPServer", "s"))
