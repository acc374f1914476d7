"""Pure renderers: an MCPServer and the policies around it become the manifests and status that should exist."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import yaml
from pydantic import ValidationError

from toolmesh.api.policy import describe_validation_error
from toolmesh.api.server import API_VERSION, MCPServerSpec
from toolmesh.api.status import set_condition
from toolmesh.operator.inject import (
    POLICY_FILE, SIDECAR_PORT, STDIO_DIR, STDIO_VOLUME, SecretMount, SidecarOptions, StateStore, inject_pod,
)
from toolmesh.operator.merge import MergedPolicy, PolicySource, merge_policies

MANAGED_BY = {"app.kubernetes.io/managed-by": "toolmesh"}
SERVER_LABEL = "toolmesh.io/server"
SERVER_CONTAINER = "mcp-server"

# The server container of a stdio MCPServer: stdin and stdout on FIFOs in the shared emptyDir, which the
# sidecar bridges. Whoever comes first makes the FIFOs (mode 666: the emptyDir is private to the pod and the
# two containers may run as different users); "$@" keeps the user's command and arguments intact.
STDIO_WRAPPER = (
    'D="$TOOLMESH_STDIO_DIR"; for f in in.fifo out.fifo; do [ -p "$D/$f" ] || mkfifo -m 666 "$D/$f" 2>/dev/null'
    ' || [ -p "$D/$f" ] || exit 1; done; exec "$@" <"$D/in.fifo" >"$D/out.fifo"'
)


SecretKeys = Callable[[str], "Collection[str] | None"]
"""Name of a Secret in the server's namespace -> the keys it holds, or None when there is no such Secret."""


class MissingSecret(ValueError):
    """A policy (or the shared store's password) names a Secret, or a key of one, the server's namespace lacks.

    Report it (PolicyApplied=False, naming the Secret and key; the running pods keep their policy) and render again
    later: the Secret may be created after the policy.
    """

    def __init__(self, name: str, key: str, namespace: str, *, secret_exists: bool, where: str):
        self.name, self.key, self.namespace, self.secret_exists, self.where = name, key, namespace, secret_exists, where
        what = f"has no key {key!r}" if secret_exists else "does not exist"
        super().__init__(f"{where}: Secret {namespace}/{name} {what}")


def secret_keys_of(secret: Mapping[str, Any] | None) -> set[str] | None:
    """The keys of a Secret as the API returns it (None for no Secret): what a `SecretKeys` lookup answers."""
    if secret is None:
        return None
    return {*(secret.get("data") or {}), *(secret.get("stringData") or {})}


@dataclass(frozen=True)
class OperatorConfig:
    """Cluster-wide settings the renderers need."""

    sidecar_image: str = "ghcr.io/toolmesh/toolmesh:0.1.0"
    """The toolmesh image: runs the sidecar, and servers given only a `command`."""
    registry_url: str | None = "http://toolmesh-registry.toolmesh-system.svc:7401"
    """Where sidecars send heartbeats; None runs them without a registry."""
    cluster_domain: str = "svc"
    """Service DNS suffix used in endpoints (`<name>.<ns>.svc`)."""
    state: StateStore | None = None
    """The Redis every sidecar shares state through; None keeps it in each sidecar."""


@dataclass(frozen=True)
class RenderedServer:
    """Everything one MCPServer should have, computed without touching the cluster."""

    manifests: list[dict[str, Any]]
    """ServiceAccount, ConfigMap (unless the policy is invalid), Deployment, Service, in apply order."""
    policy: MergedPolicy
    """The merged policy and where it came from."""
    endpoint: str
    """The in-cluster MCP URL of the server's sidecar."""
    digest: str
    """A digest of the manifests: unchanged digest, nothing to apply."""
    policy_digest: str | None
    """A digest of the rendered policy file."""


def server_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "mcpserver", "app.kubernetes.io/instance": name, SERVER_LABEL: name, **MANAGED_BY}


def owner_reference(server: Mapping[str, Any]) -> dict[str, Any]:
    meta = server["metadata"]
    return {"apiVersion": API_VERSION, "kind": "MCPServer", "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _metadata(server: Mapping[str, Any], name: str) -> dict[str, Any]:
    meta = server["metadata"]
    return {"name": name, "namespace": meta["namespace"], "labels": server_labels(meta["name"]),
            "ownerReferences": [owner_reference(server)]}


def parse_spec(server: Mapping[str, Any]) -> MCPServerSpec:
    """The typed spec; raises ValueError naming each bad field (the apiserver's schema normally caught it first)."""
    try:
        return MCPServerSpec.model_validate(server.get("spec") or {})
    except ValidationError as exc:
        message, _ = describe_validation_error(exc, prefix="spec")
        raise ValueError(message) from None


def render_policy_file(server: Mapping[str, Any], merged: MergedPolicy) -> str:
    """The `policy.yaml` the sidecar reads: an MCPToolPolicy manifest naming where each section came from."""
    meta = server["metadata"]
    doc = {
        "apiVersion": API_VERSION,
        "kind": "MCPToolPolicy",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "annotations": {"toolmesh.io/merged-from": ",".join(merged.applied)},
        },
        "spec": merged.spec,
    }
    return yaml.safe_dump(doc, sort_keys=True, default_flow_style=False, width=120)


def mount_policy_secrets(spec: Mapping[str, Any], namespace: str,
                         secret_keys: SecretKeys | None) -> tuple[dict[str, Any], tuple[SecretMount, ...]]:
    """The merged spec with every `secretRef` turned into the `secretFile` the operator mounts, and the mounts.

    With `secret_keys`, each named Secret and key must exist (MissingSecret otherwise); without it nothing is
    checked and a missing one stops the pod at the kubelet.
    """
    spec = copy.deepcopy(dict(spec))
    wanted: dict[str, set[str]] = {}
    for index, issuer in enumerate(((spec.get("auth") or {}).get("issuers")) or []):
        ref = issuer.get("secretRef") if isinstance(issuer, dict) else None
        if not ref:
            continue
        name, key = ref["name"], ref["key"]
        if secret_keys is not None:
            keys = secret_keys(name)
            if keys is None or key not in keys:
                raise MissingSecret(name, key, namespace, secret_exists=keys is not None,
                                    where=f"spec.auth.issuers[{index}].secretRef")
        wanted.setdefault(name, set()).add(key)
        del issuer["secretRef"]
        issuer["secretFile"] = SecretMount(name, ()).path(key)
    mounts = tuple(SecretMount(name, tuple(sorted(keys))) for name, keys in sorted(wanted.items()))
    return spec, mounts


def render_service_account(server: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(server, server["metadata"]["name"]),
            "automountServiceAccountToken": False}


def policy_configmap_name(name: str) -> str:
    return f"{name}-policy"


def render_configmap(server: Mapping[str, Any], policy_text: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(server, policy_configmap_name(server["metadata"]["name"])),
            "data": {POLICY_FILE: policy_text}}


def sidecar_options(server: Mapping[str, Any], spec: MCPServerSpec, config: OperatorConfig) -> SidecarOptions:
    name = server["metadata"]["name"]
    return SidecarOptions(
        image=config.sidecar_image, server_name=name, transport=spec.transport.value, upstream_port=spec.port,
        upstream_path=spec.path, policy_configmap=policy_configmap_name(name), registry_url=config.registry_url,
        env=heartbeat_traits(spec) if config.registry_url else (), state=config.state,
    )


def heartbeat_traits(spec: MCPServerSpec) -> tuple[tuple[str, str], ...]:
    """What the sidecar reports about its server to the registry: gateway priority and delegation traits."""
    traits = [("TOOLMESH_SERVER_PRIORITY", str(spec.priority)),
              ("TOOLMESH_SERVER_MAX_CONCURRENT", str(spec.maxConcurrent))]
    if spec.capabilities:
        traits.append(("TOOLMESH_SERVER_CAPABILITIES", ",".join(spec.capabilities)))
    return tuple(traits)


def server_container(spec: MCPServerSpec, config: OperatorConfig) -> dict[str, Any]:
    """The MCP server itself, unchanged except that a stdio server's streams go to the FIFOs."""
    container: dict[str, Any] = {"name": SERVER_CONTAINER, "image": spec.image or config.sidecar_image}
    if spec.image is None:
        container["imagePullPolicy"] = "IfNotPresent"  # the toolmesh image, pulled as the sidecar is
    elif spec.imagePullPolicy:
        container["imagePullPolicy"] = spec.imagePullPolicy
    env = [{"name": e.name, "value": e.value} for e in spec.env]
    if spec.transport.value == "stdio":
        container["command"] = ["/bin/sh", "-c", STDIO_WRAPPER, "sh", *spec.command, *spec.args]
        env.append({"name": "TOOLMESH_STDIO_DIR", "value": STDIO_DIR})
        container["volumeMounts"] = [{"name": STDIO_VOLUME, "mountPath": STDIO_DIR}]
    else:
        if spec.command:
            container["command"] = list(spec.command)
        if spec.args:
            container["args"] = list(spec.args)
        env.append({"name": "PORT", "value": str(spec.port)})
        container["ports"] = [{"name": "mcp-upstream", "containerPort": spec.port, "protocol": "TCP"}]
    if env:
        container["env"] = env
    return container


def render_deployment(server: Mapping[str, Any], spec: MCPServerSpec, config: OperatorConfig,
                      secrets: tuple[SecretMount, ...] = ()) -> dict[str, Any]:
    name = server["metadata"]["name"]
    labels = server_labels(name)
    template = {
        "metadata": {"labels": labels},
        "spec": {
            "serviceAccountName": name,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "containers": [server_container(spec, config)],
        },
    }
    template = inject_pod(template, replace(sidecar_options(server, spec, config), secrets=secrets))
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(server, name),
        "spec": {"replicas": spec.replicas, "selector": {"matchLabels": {SERVER_LABEL: name}}, "template": template},
    }


def render_service(server: Mapping[str, Any]) -> dict[str, Any]:
    name = server["metadata"]["name"]
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _metadata(server, name),
        "spec": {
            "selector": {SERVER_LABEL: name},
            # The sidecar's port, never the server's: every call goes through policy.
            "ports": [{"name": "mcp", "port": SIDECAR_PORT, "targetPort": SIDECAR_PORT, "protocol": "TCP",
                       "appProtocol": "http"}],
            # An MCP session lives in one pod: a client's connections must all reach the pod that opened it.
            # Without affinity, a new connection of the same session may land on another replica, which answers
            # "session not found" (the reference servers say 400 "No valid session ID provided"). This is the
            # path of every client that calls the Service, and of a registry replica serving the server from its
            # status (it does not hear the pods' heartbeats, so it knows only this address).
            "sessionAffinity": "ClientIP",
        },
    }


def endpoint(server: Mapping[str, Any], config: OperatorConfig) -> str:
    meta = server["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.{config.cluster_domain}:{SIDECAR_PORT}/mcp"


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def render_server(server: Mapping[str, Any], policies: Iterable[PolicySource], config: OperatorConfig,
                  secret_keys: SecretKeys | None = None) -> RenderedServer:
    """All manifests of one MCPServer. Raises ValueError (naming the field) for a spec the model rejects, and its
    subclass MissingSecret for a `secretRef` to a Secret or key `secret_keys` does not know."""
    spec = parse_spec(server)
    labels = (server["metadata"].get("labels") or {})
    merged = merge_policies(policies, labels, spec.policy)
    manifests = [render_service_account(server)]
    policy_digest = None
    secrets: tuple[SecretMount, ...] = ()
    if merged.error is None:
        mounted, secrets = mount_policy_secrets(merged.spec, server["metadata"]["namespace"], secret_keys)
        text = render_policy_file(server, replace(merged, spec=mounted))
        policy_digest = digest(text)
        manifests.append(render_configmap(server, text))
    state = config.state
    if state is not None and state.secret and secret_keys is not None:
        # The sidecar reads the store's password through a secretKeyRef: without the Secret its pod would not
        # start. Said now, in the status, rather than by a pod stuck in CreateContainerConfigError.
        keys = secret_keys(state.secret)
        if keys is None or state.secret_key not in keys:
            raise MissingSecret(state.secret, state.secret_key, server["metadata"]["namespace"],
                                secret_exists=keys is not None,
                                where="the shared store's password (operator --state-redis-secret, "
                                      "Helm state.redis.existingSecret)")
    manifests += [render_deployment(server, spec, config, secrets), render_service(server)]
    return RenderedServer(manifests=manifests, policy=merged, endpoint=endpoint(server, config),
                          digest=digest(manifests), policy_digest=policy_digest)


# --- status ---------------------------------------------------------------------------------------------------------

def condition(type_: str, ok: bool | None, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return {"type": type_, "status": status, "reason": reason, "message": message, "observedGeneration": generation}


def ready_condition(deployment: Mapping[str, Any] | None, generation: int | None) -> dict[str, Any]:
    """Ready = the Deployment has an available replica (or none are wanted)."""
    if deployment is None:
        return condition("Ready", False, "Progressing", "the Deployment is being created", generation)
    wanted = (deployment.get("spec") or {}).get("replicas", 1)
    available = (deployment.get("status") or {}).get("availableReplicas") or 0
    if wanted == 0:
        return condition("Ready", True, "ScaledToZero", "no replicas wanted", generation)
    if available > 0:
        return condition("Ready", True, "Available", f"{available}/{wanted} replicas available", generation)
    return condition("Ready", False, "Progressing", f"0/{wanted} replicas available", generation)


def policy_condition(merged: MergedPolicy | None, generation: int | None, error: str | None = None) -> dict[str, Any]:
    if error:
        return condition("PolicyApplied", False, "InvalidSpec", error, generation)
    assert merged is not None
    holds, reason, message = merged.describe()
    return condition("PolicyApplied", holds, reason, message, generation)


def server_status(server: Mapping[str, Any], rendered: RenderedServer | None, deployment: Mapping[str, Any] | None,
                  now: str, error: str | None = None) -> dict[str, Any]:
    """The status the operator owns (conditions Ready and PolicyApplied, endpoint, appliedPolicies).

    The registry owns Healthy, toolCount and tools; Healthy starts Unknown until it reports.
    """
    generation = server["metadata"].get("generation")
    current = server.get("status") or {}
    conditions = list(current.get("conditions") or [])
    if not any(c.get("type") == "Healthy" for c in conditions):
        conditions = set_condition(conditions, condition(
            "Healthy", None, "AwaitingHeartbeat", "the registry has not heard from a sidecar yet", generation), now)
    conditions = set_condition(conditions, ready_condition(deployment, generation), now)
    conditions = set_condition(conditions, policy_condition(rendered.policy if rendered else None, generation, error),
                               now)
    order = {"Ready": 0, "PolicyApplied": 1, "Healthy": 2}
    conditions.sort(key=lambda c: order.get(c.get("type"), 3))
    status: dict[str, Any] = {"observedGeneration": generation, "conditions": conditions}
    if rendered is not None:
        status["endpoint"] = rendered.endpoint
        status["appliedPolicies"] = list(rendered.policy.applied)
        if rendered.policy_digest:
            status["policyHash"] = rendered.policy_digest
    return status


def policy_status(policy: PolicySource, body: Mapping[str, Any], servers: Sequence[str], now: str) -> dict[str, Any]:
    """Where a policy applies, and Accepted with the reason when it is invalid."""
    generation = (body.get("metadata") or {}).get("generation")
    current = (body.get("status") or {}).get("conditions") or []
    if policy.valid:
        cond = condition("Accepted", True, "Valid", f"applies to {len(servers)} MCPServer(s)", generation)
    else:
        cond = condition("Accepted", False, "InvalidSpec", policy.error or "invalid", generation)
    names = sorted(servers) if policy.valid else []
    return {"observedGeneration": generation, "conditions": set_condition(current, cond, now),
            "servers": names, "serverCount": len(names)}
