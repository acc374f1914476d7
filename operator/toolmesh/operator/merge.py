"""Which MCPToolPolicies apply to a server, and how they merge into the one policy its sidecar reads.

The rule, per section of the spec (`auth`, `authorization`, `rateLimit`, `cache`,
`budget`, `retry`, `circuitBreaker`, `timeouts`, `audit`, `tools`): the policy
with the highest `precedence` that sets the section wins it whole; on equal
precedence the policy whose name sorts first wins. A server's inline
`spec.policy` ranks below every MCPToolPolicy. Sections are never mixed
field by field, so a merged section is always one that someone wrote.

A policy whose current generation the model refuses keeps its last accepted
spec (kept by the operator in `status.acceptedSpec`) in force, selector
included: an invalid edit never loosens a server, and the server is told.
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
    """One MCPToolPolicy as the operator sees it: its name, its spec, and the last spec the operator accepted."""

    name: str
    """metadata.name."""
    spec: Mapping[str, Any]
    """The spec as written (camelCase)."""
    labels_selector: LabelSelector | None = None
    """The parsed selector; None when the spec is invalid."""
    error: str | None = None
    """Why the spec is invalid, naming each bad field; None when valid."""
    generation: int | None = None
    """metadata.generation of `spec`."""
    accepted: Mapping[str, Any] | None = None
    """When `spec` is invalid: the spec of the last generation that was valid (`status.acceptedSpec`), which stays
    in force where it applied, so a wrong edit never switches protection off; None if no generation ever was."""
    accepted_generation: int | None = None
    """The generation `accepted` was written as."""
    accepted_selector: LabelSelector | None = None
    """The selector of `accepted`."""
    written_selector: LabelSelector | None = None
    """When `spec` is invalid: its selector on its own, if that part parses (to say which servers it meant)."""

    @property
    def in_force(self) -> Mapping[str, Any] | None:
        """The spec merged into servers: the current one if valid, else the last accepted one (or none)."""
        return self.spec if self.valid else self.accepted

    @property
    def precedence(self) -> int:
        value = (self.in_force or self.spec).get("precedence", 0)
        return value if isinstance(value, int) else 0

    @property
    def valid(self) -> bool:
        return self.error is None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PolicySource:
        meta = body.get("metadata") or {}
        name, generation = meta.get("name", ""), meta.get("generation")
        spec = dict(body.get("spec") or {})
        try:
            parsed = MCPToolPolicySpec.model_validate(spec)
        except ValidationError as exc:
            message, _ = describe_validation_error(exc, prefix="spec")
            return cls(name=name, spec=spec, error=message, generation=generation,
                       written_selector=_selector_alone(spec), **_last_accepted(body.get("status") or {}))
        return cls(name=name, spec=spec, labels_selector=parsed.selector, generation=generation)

    def selects(self, labels: Mapping[str, str]) -> bool:
        """True when the spec in force (the current one, or the last accepted one) applies to these labels."""
        selector = self.labels_selector if self.valid else self.accepted_selector
        return selector is not None and selector.matches(labels)

    def meant_for(self, labels: Mapping[str, str]) -> bool:
        """True when this policy, invalid, selects these labels in either its accepted or its written form.

        A selector that does not parse on its own counts as selecting everything: better to name the policy on a
        server it did not mean than to stay silent on one it did.
        """
        if self.valid:
            return self.selects(labels)
        written = self.written_selector is None or self.written_selector.matches(labels)
        return self.selects(labels) or written

    def invalid_reason(self) -> str:
        """What a server it selects is told: which generation is wrong, why, and what stays in force."""
        which = f"MCPToolPolicy {self.name}" + (f" generation {self.generation}" if self.generation else "")
        if self.accepted is None:
            return f"{which} is invalid and no generation of it was ever accepted, so none applies: {self.error}"
        kept = f"generation {self.accepted_generation}" if self.accepted_generation else "its last valid spec"
        return f"{which} is invalid, {kept} stays in force: {self.error}"


def _selector_alone(spec: Mapping[str, Any]) -> LabelSelector | None:
    try:
        return LabelSelector.model_validate(spec.get("selector") or {})
    except ValidationError:
        return None


def _last_accepted(status: Mapping[str, Any]) -> dict[str, Any]:
    """The last accepted spec from a policy's status, if there is one and it still parses."""
    accepted = status.get("acceptedSpec")
    if not isinstance(accepted, Mapping):
        return {}
    try:
        parsed = MCPToolPolicySpec.model_validate(accepted)
    except ValidationError:
        return {}  # written by an older model that allowed more: nothing we can enforce
    generation = status.get("acceptedGeneration")
    return {"accepted": dict(accepted), "accepted_selector": parsed.selector,
            "accepted_generation": generation if isinstance(generation, int) else None}


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
    invalid: dict[str, str] = field(default_factory=dict)
    """Invalid policies meant for the server -> what it is told: each one's last accepted spec is merged instead
    (an invalid edit never loosens a server), or, for one never accepted, nothing of it."""

    def describe(self) -> tuple[bool, str, str]:
        """The PolicyApplied condition: (holds, reason, message naming which policy won which section)."""
        if self.error:
            return False, "InvalidPolicy", self.error
        if not self.applied and not self.invalid:
            return True, "NoPolicy", "no policy selects this server: observability only"
        parts = [f"merged from {', '.join(self.applied)}" if self.applied else "no valid policy applies"]
        by_policy: dict[str, list[str]] = {}
        for section, name in self.winners.items():
            by_policy.setdefault(name, []).append(section)
        if by_policy:
            parts.append("; ".join(f"{', '.join(sections)} from {name}" for name, sections in by_policy.items()))
        if self.invalid:
            return False, "InvalidPolicy", "; ".join([*self.invalid.values(), *parts])
        return True, "Merged", ": ".join(parts)


def rank(sources: Iterable[PolicySource]) -> list[PolicySource]:
    """Lowest rank first: ascending precedence, and on ties the name sorting first comes last (so it wins)."""
    by_name_desc = sorted(sources, key=lambda s: s.name, reverse=True)
    return sorted(by_name_desc, key=lambda s: s.precedence)


def merge_policies(policies: Iterable[PolicySource], labels: Mapping[str, str],
                   inline: Mapping[str, Any] | None = None) -> MergedPolicy:
    """Merge the policies selecting `labels` (and the inline policy) into one spec.

    An invalid policy takes part with its last accepted spec where that selected the server, and is listed in
    `invalid` wherever it is meant for the server.
    """
    policies = list(policies)
    ranked = rank(p for p in policies if p.in_force is not None and p.selects(labels))
    invalid = {p.name: p.invalid_reason() for p in sorted(policies, key=lambda p: p.name)
               if not p.valid and p.meant_for(labels)}
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if inline:
        layers.append((INLINE, inline))
    layers += [(p.name, p.in_force or {}) for p in ranked]
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
                        error=error, invalid=invalid)
