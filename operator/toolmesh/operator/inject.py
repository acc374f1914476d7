"""The one sidecar injection: adds the toolmesh sidecar to a pod, used by Deployment rendering and the webhook alike."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SIDECAR_NAME = "toolmesh-sidecar"
SIDECAR_PORT = 7400
POLICY_VOLUME = "toolmesh-policy"
POLICY_DIR = "/etc/toolmesh/policy"
POLICY_FILE = "policy.yaml"
TOKEN_VOLUME = "toolmesh-token"
TOKEN_DIR = "/var/run/secrets/toolmesh"
# Beside the token's folder, never inside it: that one is a read-only projected volume, where no mount point can be
# made, and it holds the registry credential, which a policy must not be able to name.
POLICY_SECRETS_DIR = "/var/run/secrets/toolmesh-policy"
TOKEN_AUDIENCE = "toolmesh-registry"
TMP_VOLUME = "toolmesh-tmp"
STDIO_VOLUME = "toolmesh-stdio"
STDIO_DIR = "/var/run/toolmesh/stdio"

INJECT_LABEL = "toolmesh.io/inject"
INJECTED_ANNOTATION = "toolmesh.io/injected"
UPSTREAM_PORT_ANNOTATION = "toolmesh.io/upstream-port"
UPSTREAM_PATH_ANNOTATION = "toolmesh.io/upstream-path"
TRANSPORT_ANNOTATION = "toolmesh.io/transport"
POLICY_ANNOTATION = "toolmesh.io/policy-configmap"
SERVER_NAME_ANNOTATION = "toolmesh.io/server-name"

DEFAULT_RESOURCES: Mapping[str, Any] = {
    "requests": {"cpu": "50m", "memory": "64Mi"},
    "limits": {"memory": "128Mi"},
}


class InjectionError(ValueError):
    """The pod asks for something the sidecar cannot do (bad annotation); the message says which and why."""


@dataclass(frozen=True)
class SecretMount:
    """Keys of one Secret a policy names, mounted read-only into the sidecar only (never the server container)."""

    secret: str
    """The Secret's name, in the pod's namespace."""
    keys: tuple[str, ...]
    """The keys mounted, each as a file of that name; no other key of the Secret enters the pod."""

    @property
    def directory(self) -> str:
        return f"{POLICY_SECRETS_DIR}/{self.secret}"

    @property
    def volume(self) -> str:
        # Volume names are DNS labels (63 characters, no dots); Secret names may be longer and dotted.
        if len(self.secret) <= 47 and "." not in self.secret:
            return f"toolmesh-secret-{self.secret}"
        return f"toolmesh-secret-{hashlib.sha256(self.secret.encode()).hexdigest()[:16]}"

    def path(self, key: str) -> str:
        """The file the sidecar reads for `key`."""
        return f"{self.directory}/{key}"


@dataclass(frozen=True)
class StateStore:
    """The Redis-protocol server sidecars share rate limits, quotas and conversations through."""

    url: str
    """`redis://`, `rediss://` (TLS) or `unix://`; no password in it."""
    secret: str | None = None
    """A Secret in the server's namespace holding the password (a secretKeyRef cannot reach another namespace)."""
    secret_key: str = "password"
    """The Secret's key holding the password."""


@dataclass(frozen=True)
class SidecarOptions:
    """Everything that decides the sidecar container and volumes for one pod."""

    image: str
    """The toolmesh image (entry point `toolmesh`)."""
    server_name: str
    """The MCP server's name, reported to the registry and used in the gateway's `server__tool` names."""
    transport: str = "streamable-http"
    """streamable-http, sse or stdio."""
    upstream_port: int = 8080
    """Port of the MCP server in the pod (HTTP transports)."""
    upstream_path: str = "/mcp"
    """HTTP path of the MCP server's endpoint (HTTP transports)."""
    policy_configmap: str | None = None
    """ConfigMap holding `policy.yaml`, mounted as a directory so updates reach the running sidecar."""
    registry_url: str | None = None
    """Where heartbeats and traces go; None runs the sidecar without a registry."""
    resources: Mapping[str, Any] = field(default_factory=lambda: copy.deepcopy(dict(DEFAULT_RESOURCES)))
    """The sidecar container's requests and limits."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment for the sidecar (e.g. the server's priority and capabilities for its heartbeats)."""
    secrets: tuple[SecretMount, ...] = ()
    """Secrets the policy names (`secretRef`), mounted under POLICY_SECRETS_DIR/<name>/."""
    state: StateStore | None = None
    """The shared store of every replica and server; None keeps state in each sidecar."""

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}{self.upstream_path}"


def sidecar_args(options: SidecarOptions) -> list[str]:
    """The `toolmesh sidecar` arguments (README, Command line), listening on every pod address."""
    args = ["sidecar", "--listen", f"0.0.0.0:{SIDECAR_PORT}", "--server-name", options.server_name]
    if options.transport == "stdio":
        args += ["--upstream-fifo-dir", STDIO_DIR]
    else:
        args += ["--upstream", options.upstream_url]
        if options.transport == "sse":
            args += ["--upstream-transport", "sse"]
    if options.policy_configmap:
        args += ["--policy", f"{POLICY_DIR}/{POLICY_FILE}"]
    if options.registry_url:
        args += ["--registry", options.registry_url]
    return args


def sidecar_container(options: SidecarOptions) -> dict[str, Any]:
    """The native sidecar: an initContainer that keeps running (restartPolicy Always) beside the server."""
    mounts = [{"name": TMP_VOLUME, "mountPath": "/tmp"}]
    if options.policy_configmap:
        mounts.append({"name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": True})
    if options.registry_url:
        mounts.append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
    if options.transport == "stdio":
        mounts.append({"name": STDIO_VOLUME, "mountPath": STDIO_DIR})
    mounts += [{"name": m.volume, "mountPath": m.directory, "readOnly": True} for m in options.secrets]
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # The address the sidecar advertises to the registry: it listens on 0.0.0.0.
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        *({"name": name, "value": value} for name, value in options.env),
    ]
    if options.registry_url:
        env.append({"name": "TOOLMESH_REGISTRY_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"})
    if options.state is not None:
        env.append({"name": "TOOLMESH_STATE_REDIS_URL", "value": options.state.url})
        if options.state.secret:
            env.append({"name": "TOOLMESH_STATE_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {
                "name": options.state.secret, "key": options.state.secret_key}}})

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": SIDECAR_PORT}, "periodSeconds": period, "failureThreshold": failures}

    return {
        "name": SIDECAR_NAME,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["toolmesh"],
        "args": sidecar_args(options),
        "restartPolicy": "Always",
        "ports": [{"name": "toolmesh-mcp", "containerPort": SIDECAR_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": copy.deepcopy(dict(options.resources)),
        # /healthz only: the server container starts after this passes, so it cannot wait for the upstream.
        "startupProbe": probe("/healthz", 1, 30),
        "livenessProbe": probe("/healthz", 10, 3),
        "readinessProbe": probe("/readyz", 5, 3),
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }


def sidecar_volumes(options: SidecarOptions) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [{"name": TMP_VOLUME, "emptyDir": {}}]
    if options.policy_configmap:
        volumes.append({"name": POLICY_VOLUME, "configMap": {"name": options.policy_configmap}})
    if options.registry_url:
        volumes.append({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}})
    if options.transport == "stdio":
        volumes.append({"name": STDIO_VOLUME, "emptyDir": {}})
    volumes += [{"name": m.volume, "secret": {"secretName": m.secret, "items": [{"key": k, "path": k} for k in m.keys]}}
                for m in options.secrets]
    return volumes


def is_injected(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec") or {}
    return any(c.get("name") == SIDECAR_NAME for c in spec.get("initContainers") or [])


def inject_pod(pod: Mapping[str, Any], options: SidecarOptions) -> dict[str, Any]:
    """A copy of `pod` (an object with `metadata` and `spec`: a Pod or a pod template) with the sidecar added.

    Idempotent: a pod that already has the sidecar comes back unchanged.
    """
    result = copy.deepcopy(dict(pod))
    if is_injected(result):
        return result
    spec = result.setdefault("spec", {})
    # Native sidecars start before the other init containers, so their setup can already use it.
    spec["initContainers"] = [sidecar_container(options), *(spec.get("initContainers") or [])]
    taken = {v.get("name") for v in spec.get("volumes") or []}
    spec["volumes"] = [*(spec.get("volumes") or []), *(v for v in sidecar_volumes(options) if v["name"] not in taken)]
    meta = result.setdefault("metadata", {})
    annotations = dict(meta.get("annotations") or {})
    annotations[INJECTED_ANNOTATION] = "true"
    meta["annotations"] = annotations
    return result


def options_from_pod(pod: Mapping[str, Any], *, image: str, registry_url: str | None,
                     state: StateStore | None = None) -> SidecarOptions:
    """The sidecar options a labelled pod asks for through its annotations; InjectionError names a bad one."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    transport = annotations.get(TRANSPORT_ANNOTATION, "streamable-http")
    if transport not in ("streamable-http", "sse"):
        raise InjectionError(
            f"annotation {TRANSPORT_ANNOTATION}={transport!r}: injected pods speak streamable-http or sse"
            " (stdio servers need an MCPServer, whose command the operator wraps)")
    raw_port = annotations.get(UPSTREAM_PORT_ANNOTATION, "8080")
    try:
        port = int(raw_port)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise InjectionError(f"annotation {UPSTREAM_PORT_ANNOTATION}={raw_port!r} is not a port number (1-65535)")
    path = annotations.get(UPSTREAM_PATH_ANNOTATION, "/sse" if transport == "sse" else "/mcp")
    if not path.startswith("/"):
        raise InjectionError(f"annotation {UPSTREAM_PATH_ANNOTATION}={path!r} must start with /")
    name = (annotations.get(SERVER_NAME_ANNOTATION) or labels.get("app.kubernetes.io/name") or labels.get("app")
            or meta.get("name") or (meta.get("generateName") or "").rstrip("-") or "mcp-server")
    return SidecarOptions(
        image=image, server_name=name, transport=transport, upstream_port=port, upstream_path=path,
        policy_configmap=annotations.get(POLICY_ANNOTATION) or None, registry_url=registry_url, state=state,
    )
