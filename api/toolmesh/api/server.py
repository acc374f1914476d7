"""The MCPServer custom resource: one MCP server that toolmesh runs behind its sidecar."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GROUP = "toolmesh.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class Transport(str, Enum):
    """How the server speaks MCP."""

    streamable_http = "streamable-http"
    sse = "sse"
    stdio = "stdio"


class SpecModel(BaseModel):
    """Base for spec models: camelCase fields, unknown fields rejected with their name."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_attribute_docstrings=True, frozen=True)


class EnvVar(SpecModel):
    """One environment variable for the server process/container."""

    name: str = Field(min_length=1)
    """Variable name."""
    value: str = ""
    """Variable value."""


# Rules that cross fields, checked by the apiserver (CEL) before the operator sees the resource.
SERVER_RULES = [
    {
        "rule": "has(self.image) || size(self.command) > 0",
        "message": "spec.image is required unless spec.command is given (then the toolmesh image runs the command)",
        "fieldPath": ".image",
        "reason": "FieldValueRequired",
    },
    {
        "rule": "self.transport != 'stdio' || size(self.command) > 0",
        "message": "spec.command is required for transport stdio: the operator wraps it to run on FIFOs the sidecar bridges",
        "fieldPath": ".command",
        "reason": "FieldValueRequired",
    },
]


class MCPServerSpec(SpecModel):
    """What to run and how clients reach it."""

    model_config = ConfigDict(**SpecModel.model_config, json_schema_extra={"x-kubernetes-validations": SERVER_RULES})

    image: str | None = None
    """Container image of the MCP server (Kubernetes). Local mode (`toolmesh up`) ignores it and runs `command`."""
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """When the kubelet pulls `image`: Kubernetes' own default when unset (Always for `:latest` or no tag,
    else IfNotPresent). Air-gapped clusters with images loaded onto their nodes set IfNotPresent or Never.
    A server without `image` runs in the toolmesh image, pulled as the sidecar is (IfNotPresent)."""
    command: list[str] = Field(default_factory=list)
    """Command to start the server (container entrypoint override in Kubernetes; the process in local mode)."""
    args: list[str] = Field(default_factory=list)
    """Arguments to `command`."""
    env: list[EnvVar] = Field(default_factory=list)
    """Environment variables for the server."""
    transport: Transport = Transport.streamable_http
    """How the server speaks MCP: streamable-http (default), sse (legacy HTTP+SSE) or stdio."""
    port: int = Field(default=8080, ge=1, le=65535)
    """Port the server listens on (HTTP transports). Local mode picks a free port and passes it as $PORT."""
    path: str = Field(default="/mcp", pattern=r"^/")
    """HTTP path of the MCP endpoint (`/mcp` for streamable-http, `/sse` for sse)."""
    replicas: int = Field(default=1, ge=0, le=100)
    """Number of pods."""
    priority: int = 0
    """When two servers expose the same tool name, the higher priority also answers to the bare name in the gateway."""
    capabilities: list[str] = Field(default_factory=list)
    """Capabilities this server offers to delegation workflows (e.g. "summarize", "research")."""
    maxConcurrent: int = Field(default=3, ge=1, le=1000)
    """How many delegated workflow tasks this server runs at once."""
    policy: dict | None = None
    """An inline MCPToolPolicy spec applied to this server only (lowest precedence)."""
