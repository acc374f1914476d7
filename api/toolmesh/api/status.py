"""What toolmesh reports back on its custom resources: conditions and the status of MCPServer and MCPToolPolicy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StatusModel(BaseModel):
    """Base for status models: camelCase, unknown fields ignored (older or newer writers may add some)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, use_attribute_docstrings=True)


class ConditionStatus(str, Enum):
    """Whether a condition holds, as Kubernetes spells it."""

    true = "True"
    false = "False"
    unknown = "Unknown"


class Condition(StatusModel):
    """One observation about the resource, in the Kubernetes condition convention."""

    type: str = Field(min_length=1)
    """What is observed: Ready, PolicyApplied, Healthy (MCPServer) or Accepted (MCPToolPolicy)."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = ""
    """One CamelCase word saying why, for machines."""
    message: str = ""
    """A sentence saying why, for people."""
    observedGeneration: int | None = None
    """The `metadata.generation` this condition was computed from."""
    lastTransitionTime: str | None = None
    """When `status` last changed (RFC 3339)."""


def set_condition(conditions: Sequence[Mapping[str, Any]], new: Mapping[str, Any], now: str) -> list[dict[str, Any]]:
    """`conditions` with `new` put in place of the one of its type; lastTransitionTime moves only when status does."""
    out: list[dict[str, Any]] = []
    replaced = False
    for cond in conditions:
        if cond.get("type") == new["type"]:
            merged = dict(new)
            same = cond.get("status") == new["status"]
            merged["lastTransitionTime"] = cond.get("lastTransitionTime", now) if same else now
            out.append(merged)
            replaced = True
        else:
            out.append(dict(cond))
    if not replaced:
        out.append({**new, "lastTransitionTime": now})
    return out


_CONDITIONS_AS_MAP = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


class ToolStatus(StatusModel):
    """One tool the server lists, as the registry last saw it."""

    name: str
    """The tool's name."""
    description: str = ""
    """The tool's description."""
    readOnly: bool = False
    """`annotations.readOnlyHint` as listed."""


class RegistryReport(StatusModel):
    """What one registry replica hears of a server's sidecars (each replica writes only its own entry)."""

    replica: str = Field(min_length=1)
    """The registry replica (its pod name)."""
    lastHeartbeat: str
    """When this replica last heard from one of the server's sidecars (RFC 3339)."""
    healthyInstances: int = 0
    """How many of the server's sidecars this replica considers healthy."""


class MCPServerStatus(StatusModel):
    """What the operator and the registry know about one MCPServer."""

    observedGeneration: int | None = None
    """The `metadata.generation` the operator last rendered."""
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=_CONDITIONS_AS_MAP)
    """Ready (a replica is available), PolicyApplied (the merged policy is in the ConfigMap), Healthy (the registry hears heartbeats)."""
    endpoint: str | None = None
    """The sidecar's MCP URL inside the cluster, e.g. http://time.default.svc:7400/mcp."""
    toolCount: int | None = None
    """How many tools the server lists (written by the registry)."""
    tools: list[ToolStatus] = Field(default_factory=list)
    """The tools the server lists (written by the registry)."""
    appliedPolicies: list[str] = Field(default_factory=list)
    """Names of the MCPToolPolicies merged into this server's policy, lowest precedence first."""
    policyHash: str | None = None
    """A digest of the merged policy file as rendered into the ConfigMap."""
    lastHeartbeat: str | None = None
    """When the registry last heard from one of the server's sidecars (RFC 3339)."""
    healthyInstances: int | None = None
    """How many sidecars of this server the registry replicas consider healthy, summed over fresh reports."""
    reports: list[RegistryReport] = Field(default_factory=list, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["replica"]})
    """Each registry replica's own view; Healthy and healthyInstances are computed from those still fresh."""


class MCPToolPolicyStatus(StatusModel):
    """Where a policy applies and whether it is valid."""

    observedGeneration: int | None = None
    """The `metadata.generation` the operator last evaluated."""
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=_CONDITIONS_AS_MAP)
    """Accepted: the spec is valid and merged into the selected servers' policies (False: the reason, and which generation stays in force)."""
    servers: list[str] = Field(default_factory=list)
    """Names of the MCPServers in this namespace the policy applies to."""
    serverCount: int = 0
    """How many MCPServers the policy applies to."""
    acceptedGeneration: int | None = None
    """The last `metadata.generation` whose spec was valid; while a later one is not, that one stays in force."""
    acceptedSpec: dict | None = None
    """The spec of `acceptedGeneration`, as written; merged into the selected servers while the current spec is invalid."""
