"""What a tool is for the policy stages: read-only, idempotent, destructive — annotations first, policy overrides on top."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from toolmesh.sidecar.state import ToolCatalog


@dataclass(frozen=True, slots=True)
class ToolTraits:
    """The traits that decide caching and retrying of one tool."""

    read_only: bool = False
    """The tool does not change anything (cacheable, retryable)."""
    idempotent: bool = False
    """Repeating the call has no further effect (retryable)."""
    destructive: bool = False
    """The tool may destroy something: not read-only and not annotated otherwise, or said so explicitly."""
    explicitly_destructive: bool = False
    """The annotation or the policy says destructive in so many words (nothing may then cache it)."""


def tool_traits(catalog: ToolCatalog, policy: Any, tool: str) -> ToolTraits:
    """The traits of `tool`: the upstream's annotations, replaced field by field by the policy's `tools` override.

    The spec's default `destructiveHint: true` means "may be destructive unless read-only";
    a read-only tool that does not say destructiveHint explicitly is therefore not destructive.
    """
    info = catalog.get(tool)
    annotations = info.definition.get("annotations")
    explicit_destructive = isinstance(annotations, Mapping) and annotations.get("destructiveHint") is True
    read_only, idempotent = info.read_only, info.idempotent
    destructive = explicit_destructive or (not info.read_only and info.destructive)
    override = policy.tool_override(tool) if policy is not None and hasattr(policy, "tool_override") else None
    explicit = explicit_destructive
    if override is not None:
        if override.readOnly is not None:
            read_only = override.readOnly
            if read_only and override.destructive is None and not explicit_destructive:
                destructive = False
        if override.idempotent is not None:
            idempotent = override.idempotent
        if override.destructive is not None:
            destructive = explicit = override.destructive
    return ToolTraits(read_only=read_only, idempotent=idempotent, destructive=destructive, explicitly_destructive=explicit)
