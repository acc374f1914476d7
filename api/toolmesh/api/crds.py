"""CustomResourceDefinitions generated from the api models: structural OpenAPI v3 schemas, printer columns, CEL rules."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel

from toolmesh.api.server import GROUP, VERSION, MCPServerSpec
from toolmesh.api.status import MCPServerStatus, MCPToolPolicyStatus

# JSON Schema keywords the apiserver understands in a structural schema, kept as they are.
_KEPT = (
    "description", "type", "format", "enum", "default", "minimum", "maximum", "minLength", "maxLength",
    "pattern", "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties", "required",
    "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-map-type",
)


@dataclass(frozen=True)
class CrdKind:
    """One custom resource kind and how `kubectl get` shows it."""

    kind: str
    """The resource kind, e.g. MCPServer."""
    plural: str
    """The plural resource name, e.g. mcpservers."""
    short_names: tuple[str, ...]
    """Abbreviations accepted by kubectl."""
    spec: type[BaseModel]
    """The pydantic model of `spec`."""
    status: type[BaseModel]
    """The pydantic model of `status`."""
    columns: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    """additionalPrinterColumns, Age last."""

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def filename(self) -> str:
        return f"{self.name}.yaml"


_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


# CEL rules mirroring validators of models this module does not own, keyed by model name: the apiserver
# then rejects what the model would reject, naming the field, before the operator ever sees it.
CEL_RULES: dict[str, list[dict[str, str]]] = {
    "Issuer": [{
        "rule": "(has(self.jwksUrl) ? 1 : 0) + (has(self.publicKey) ? 1 : 0) + (has(self.secret) ? 1 : 0)"
                " + (has(self.secretEnv) ? 1 : 0) + (has(self.secretFile) ? 1 : 0) + (has(self.secretRef) ? 1 : 0) == 1",
        "message": "exactly one of jwksUrl, publicKey, secret, secretEnv, secretFile, secretRef must be set",
    }],
    "SelectorRequirement": [{
        "rule": "(self.operator == 'In' || self.operator == 'NotIn') == (has(self.values) && size(self.values) > 0)",
        "message": "operators In and NotIn need values; Exists and DoesNotExist take none",
        "fieldPath": ".values",
    }],
    "MCPToolPolicySpec": [{
        "rule": "!has(self.authorization) || has(self.auth)",
        "message": "authorization needs auth: scopes come from verified tokens",
        "fieldPath": ".authorization",
    }],
}


def policy_spec_model() -> type[BaseModel] | None:
    """The MCPToolPolicy spec model, once `toolmesh.api.policy` defines it."""
    try:
        module = importlib.import_module("toolmesh.api.policy")
    except ImportError:
        return None
    return getattr(module, "MCPToolPolicySpec", None)


def crd_kinds() -> list[CrdKind]:
    kinds = [
        CrdKind(
            kind="MCPServer", plural="mcpservers", short_names=("mcps",), spec=MCPServerSpec, status=MCPServerStatus,
            columns=(
                {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
                {"name": "Tools", "type": "integer", "jsonPath": ".status.toolCount"},
                # Ready: the pods run; Healthy: a registry hears their heartbeats. Both at a glance.
                {"name": "Healthy", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Healthy")].status'},
                {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
                {"name": "Transport", "type": "string", "jsonPath": ".spec.transport", "priority": 1},
                _AGE,
            ),
        ),
    ]
    policy = policy_spec_model()
    if policy is not None:
        kinds.append(CrdKind(
            kind="MCPToolPolicy", plural="mcptoolpolicies", short_names=("mcptp",), spec=policy,
            status=MCPToolPolicyStatus,
            columns=(
                {"name": "Servers", "type": "integer", "jsonPath": ".status.serverCount"},
                {"name": "Precedence", "type": "integer", "jsonPath": ".spec.precedence"},
                {"name": "Accepted", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Accepted")].status'},
                _AGE,
            ),
        ))
    return kinds


class SchemaError(ValueError):
    """A model uses a JSON Schema construct that has no structural OpenAPI equivalent."""


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema turned into a Kubernetes structural OpenAPI v3 schema."""
    raw = model.model_json_schema(mode="validation")
    defs = {name: _with_rules(name, sub) for name, sub in raw.get("$defs", {}).items()}
    return _convert(_with_rules(model.__name__, raw), defs, ())


def _with_rules(name: str, node: dict[str, Any]) -> dict[str, Any]:
    rules = CEL_RULES.get(name)
    if not rules:
        return node
    return {**node, "x-kubernetes-validations": [*node.get("x-kubernetes-validations", []), *rules]}


def _resolve(node: dict[str, Any], defs: dict[str, Any], seen: tuple[str, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Inline a `$ref`, keeping the referring node's own keywords (description, default) over the target's."""
    ref = node.get("$ref")
    if ref is None:
        return node, seen
    name = ref.rsplit("/", 1)[-1]
    if name in seen:
        raise SchemaError(f"recursive model {name} cannot be expressed in a structural schema")
    merged = dict(defs[name])
    merged.update({k: v for k, v in node.items() if k != "$ref"})
    return _resolve(merged, defs, seen + (name,))


def _convert(node: dict[str, Any], defs: dict[str, Any], seen: tuple[str, ...]) -> dict[str, Any]:
    node, seen = _resolve(node, defs, seen)
    node = dict(node)

    # Optional[X] is `anyOf: [X, null]`: absent means None, so the null branch is dropped.
    for union_key in ("anyOf", "oneOf"):
        if union_key in node:
            branches = [b for b in node.pop(union_key) if b.get("type") != "null"]
            if len(branches) == 1:
                inner, seen_inner = _resolve(branches[0], defs, seen)
                outer = {k: v for k, v in node.items() if k not in ("discriminator",)}
                node = {**inner, **outer}
                seen = seen_inner
            else:
                return _any_of(node, branches, defs, seen)

    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "exclusiveMinimum" in node:
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True
    if "enum" in node and "type" not in node:
        node["type"] = _json_type(node["enum"][0])

    out: dict[str, Any] = {k: node[k] for k in _KEPT if k in node}
    for k in ("exclusiveMinimum", "exclusiveMaximum"):
        if k in node:
            out[k] = node[k]
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {name: _convert(sub, defs, seen) for name, sub in props.items()}
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = _convert(extra, defs, seen)
        elif extra is not False:
            # A free-form mapping (`dict` with no value type): the one place unknown fields are kept.
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = _convert(node.get("items", {}), defs, seen) if node.get("items") else {
            "x-kubernetes-preserve-unknown-fields": True}
    elif kind is None and "x-kubernetes-preserve-unknown-fields" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "default" in out:
        out["default"] = json.loads(json.dumps(out["default"]))
        if out["default"] is None:
            del out["default"]
    return out


def _any_of(node: dict[str, Any], branches: list[dict[str, Any]], defs: dict[str, Any],
            seen: tuple[str, ...]) -> dict[str, Any]:
    """A union of several types: int|str has a Kubernetes form; anything else keeps its value unchecked by shape."""
    resolved = [_resolve(b, defs, seen)[0] for b in branches]
    types = {b.get("type") for b in resolved}
    out: dict[str, Any] = {k: node[k] for k in ("description", "default") if k in node and node[k] is not None}
    if types == {"integer", "string"}:
        out["x-kubernetes-int-or-string"] = True
        return out
    if types <= {"object"} and all("properties" in b for b in resolved):
        # Variants of one object (e.g. a tagged union): the union of their fields; the model checks the rest.
        properties: dict[str, Any] = {}
        for b in resolved:
            for name, sub in b["properties"].items():
                properties.setdefault(name, _convert(sub, defs, seen))
        out.update({"type": "object", "properties": properties})
        return out
    out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def render_crd(kind: CrdKind) -> dict[str, Any]:
    """One CustomResourceDefinition as a plain mapping."""
    schema = {
        "type": "object",
        "description": (kind.spec.__doc__ or kind.kind).strip().splitlines()[0],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": structural_schema(kind.spec),
            "status": structural_schema(kind.status),
        },
        "required": ["spec"],
    }
    schema["properties"]["spec"].setdefault("type", "object")
    _type_inline_policy(schema["properties"]["spec"])
    _type_accepted_spec(schema["properties"]["status"], kind.spec)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.name, "labels": {"app.kubernetes.io/part-of": "toolmesh"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": list(kind.short_names),
                "categories": ["toolmesh"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [dict(c) for c in kind.columns],
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


def _type_inline_policy(spec_schema: dict[str, Any]) -> None:
    """An MCPServer's inline `policy` is checked like an MCPToolPolicy spec (it has no selector of its own)."""
    inline = spec_schema.get("properties", {}).get("policy")
    model = policy_spec_model()
    if inline is None or model is None:
        return
    typed = structural_schema(model)
    for own in ("selector", "precedence"):
        typed["properties"].pop(own, None)
    typed["description"] = inline.get("description", "")
    spec_schema["properties"]["policy"] = typed


def _type_accepted_spec(status_schema: dict[str, Any], spec: type[BaseModel]) -> None:
    """A policy's last accepted spec is kept in its status with the spec's own schema, so nothing in it is pruned."""
    accepted = status_schema.get("properties", {}).get("acceptedSpec")
    if accepted is None:
        return
    typed = structural_schema(spec)
    typed["description"] = accepted.get("description", "")
    status_schema["properties"]["acceptedSpec"] = typed


class _Dumper(yaml.SafeDumper):
    """Plain YAML: a schema reused in two places is written out twice, never as an anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(doc: dict[str, Any]) -> str:
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)
    return "---\n" + body


def render_crd_files() -> dict[str, str]:
    """File name -> YAML text, one file per CRD; names sort in the order `toolmesh crds` prints them."""
    return {kind.filename: _dump(render_crd(kind)) for kind in crd_kinds()}
