"""Which MCPToolPolicies apply to a server, and how they merge into the one policy its sidecar reads.

The rule, per section of the spec (`auth`, `authorization`, `rateLimit`, `cache`,
`budget`, `retry`, `circuitBreaker`, `timeouts`, `audit`, `tools`): the policy
with the highest `precedence` that sets the section wins it whole; on equal
precedence the policy whose name sorts first wins. A server's inline
`spec.policy` ranks below every MCPToolPolicy. Sections are never mixed
field by field, so a merged section is always one that someone wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from toolmesh.api.policy import LabelSelector, MCPToolPolicySpec, describe_validation_error

INLINE = "(inline)"
"""The name under which a server's inline `spec.policy` is listed among its applied policies."""
SELECTION_FIELDS = ("selector", "precedence")


@dataclass(frozen=True)
class PolicySource:
    """One MCPToolPolicy as the operator sees it: its name, precedence and raw spec."""

    name: str
    """metadata.name."""
    spec: Mapping[str, Any]
    """The spec as written (camelCase)."""
    labels_selector: LabelSelector | None = None
    """The parsed selector; None when the spec is invalid."""
    error: str | None = None
    """Why the spec is invalid, naming each bad field; None when valid."""

    @property
    def precedence(self) -> int:
        value = self.spec.get("precedence", 0)
        return value if isinstance(value, int) else 0

    @property
    def valid(self) -> bool:
        return self.error is None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PolicySource:
        name = (body.get("metadata") or {}).get("name", "")
        spec = dict(body.get("spec") or {})
        try:
            parsed = MCPToolPolicySpec.model_validate(spec)
        except ValidationError as exc:
            message, _ = describe_validation_error(exc, prefix="spec")
            return cls(name=name, spec=spec, error=message)
        return cls(name=name, spec=spec, labels_selector=parsed.selector)

    def selects(self, labels: Mapping[str, str]) -> bool:
        """True when this (valid) policy applies to a server with these labels."""
        return self.labels_selector is not None and self.labels_selector.matches(labels)


@dataclass(frozen=True)
class MergedPolicy:
    """The policy one server's sidecar enforces, and where each part came from."""

    spec: dict[str, Any]
    """The merged spec, without selector and precedence."""
    applied: list[str] = field(default_factory=list)
    """Policies that apply to the server, lowest rank first (the inline policy as "(inline)")."""
    winners: dict[str, str] = field(default_factory=dict)
    """Section -> name of the policy that set it."""
    error: str | None = None
    """Why the merged result is not a valid policy (e.g. authorization from one policy, no auth anywhere)."""


def rank(sources: Iterable[PolicySource]) -> list[PolicySource]:
    """Lowest rank first: ascending precedence, and on ties the name sorting first comes last (so it wins)."""
    by_name_desc = sorted(sources, key=lambda s: s.name, reverse=True)
    return sorted(by_name_desc, key=lambda s: s.precedence)


def merge_policies(policies: Iterable[PolicySource], labels: Mapping[str, str],
                   inline: Mapping[str, Any] | None = None) -> MergedPolicy:
    """Merge the valid policies selecting `labels` (and the inline policy) into one spec."""
    ranked = rank(p for p in policies if p.valid and p.selects(labels))
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if inline:
        layers.append((INLINE, inline))
    layers += [(p.name, p.spec) for p in ranked]
    spec: dict[str, Any] = {}
    winners: dict[str, str] = {}
    for name, layer in layers:
        for section, value in layer.items():
            if section in SELECTION_FIELDS or value is None:
                continue
            spec[section] = value
            winners[section] = name
    spec = {k: spec[k] for k in sorted(spec)}
    error = None
    try:
        MCPToolPolicySpec.model_validate(spec)
    except ValidationError as exc:
        message, _ = describe_validation_error(exc, prefix="spec")
        error = f"the merged policy is invalid: {message}"
    return MergedPolicy(spec=spec, applied=[name for name, _ in layers], winners=dict(sorted(winners.items())),
                        error=error)
