"""What a tool is for the policy stages: read-only, idempotent, destructive — annotations first, policy overrides on top."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

from toolmesh.sidecar.chain.state import TOOL_LISTING, SharedState, ToolCatalog
from toolmesh.sidecar.transports.tools import list_tools

if TYPE_CHECKING:
    from toolmesh.api.policy import MCPToolPolicySpec

log = logging.getLogger("toolmesh.sidecar.tools")

RELIST_MIN_SECONDS = 5.0
"""Least time between two listings this module starts (a broken upstream is not asked on every call)."""


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


def tool_traits(catalog: ToolCatalog, policy: MCPToolPolicySpec | None, tool: str) -> ToolTraits:
    """The traits of `tool`: the upstream's annotations, replaced field by field by the policy's `tools` override.

    The spec's default `destructiveHint: true` means "may be destructive unless read-only";
    a read-only tool that does not say destructiveHint explicitly is therefore not destructive.
    """
    info = catalog.get(tool)
    annotations = info.definition.get("annotations")
    explicit_destructive = isinstance(annotations, Mapping) and annotations.get("destructiveHint") is True
    read_only, idempotent = info.read_only, info.idempotent
    destructive = explicit_destructive or (not info.read_only and info.destructive)
    override = policy.tool_override(tool) if policy is not None else None
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


class Listing:
    """The one background `tools/list` in flight, and when the last one began."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.started = float("-inf")


def ensure_listed(shared: SharedState) -> None:
    """Start listing the upstream's tools in the background when the catalogue is stale; never waits.

    Heartbeats list tools when a registry is configured; a sidecar without one still needs the
    annotations that decide caching and retrying, so a stage that finds the catalogue stale asks
    for it here. Calls made before the listing lands are treated as unknown tools (not cached,
    not retried), which is the safe side.
    """
    if not shared.tools.stale or shared.upstream is None:
        return
    listing = shared.kept(TOOL_LISTING, Listing)
    now = time.monotonic()
    if (listing.task is not None and not listing.task.done()) or now - listing.started < RELIST_MIN_SECONDS:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    listing.started = now
    listing.task = loop.create_task(_list(shared), name="toolmesh-tools-list")


async def _list(shared: SharedState) -> None:
    try:
        tools = await list_tools(shared.upstream)
    except Exception as exc:  # noqa: BLE001 - a failed listing only delays caching/retrying decisions
        log.info("could not list the upstream's tools: %r", exc)
        return
    shared.tools.update(tools)
