"""The CRDs in crds/ are exactly what the api models generate, and the generated schemas are structural."""

from __future__ import annotations

import subprocess

import yaml

from helpers import ROOT, TOOLMESH
from toolmesh.api.crds import render_crd_files

CRD_DIR = ROOT / "crds"


def _walk(node, path=""):
    """Every schema node with its path."""
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_committed_crds_match_the_models():
    generated = render_crd_files()
    on_disk = {p.name: p.read_text() for p in CRD_DIR.glob("*.yaml")}
    assert sorted(on_disk) == sorted(generated), "crds/ holds other files than `make crds` writes"
    for name, text in generated.items():
        assert on_disk[name] == text, f"crds/{name} is stale: run `make crds`"


def test_toolmesh_crds_prints_the_files_in_sorted_order():
    out = subprocess.run([TOOLMESH, "crds"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out == "".join(p.read_text() for p in sorted(CRD_DIR.glob("*.yaml")))


def test_generation_is_deterministic():
    assert render_crd_files() == render_crd_files()


def test_kinds_names_and_printer_columns():
    docs = {d["spec"]["names"]["kind"]: d for d in yaml.safe_load_all("".join(render_crd_files().values()))}
    assert set(docs) == {"MCPServer", "MCPToolPolicy"}
    server = docs["MCPServer"]["spec"]
    assert server["group"] == "toolmesh.io" and server["scope"] == "Namespaced"
    assert server["names"]["shortNames"] == ["mcps"]
    assert docs["MCPToolPolicy"]["spec"]["names"]["shortNames"] == ["mcptp"]
    version = server["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    shown = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert shown == ["Ready", "Tools", "Healthy", "Endpoint", "Age"]
    policy_cols = [c["name"] for c in docs["MCPToolPolicy"]["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert policy_cols[0] == "Servers" and policy_cols[-1] == "Age"


def test_schemas_are_structural():
    for doc in yaml.safe_load_all("".join(render_crd_files().values())):
        schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema):
            assert "$ref" not in node and "title" not in node and "anyOf" not in node, path
            assert "additionalProperties" not in node or "properties" not in node, path
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields") or node.get(
                "x-kubernetes-int-or-string"), f"{doc['metadata']['name']}{path} has no type"


def test_defaults_enums_bounds_and_cel_rules_are_carried():
    docs = {d["spec"]["names"]["kind"]: d for d in yaml.safe_load_all("".join(render_crd_files().values()))}
    spec = docs["MCPServer"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = spec["properties"]
    assert props["transport"]["enum"] == ["streamable-http", "sse", "stdio"]
    assert props["transport"]["default"] == "streamable-http"
    assert (props["port"]["minimum"], props["port"]["maximum"], props["port"]["default"]) == (1, 65535, 8080)
    assert props["path"]["pattern"] == "^/"
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("has(self.image)" in r for r in rules)
    # The inline policy is typed like a policy spec rather than left free-form.
    assert "auth" in props["policy"]["properties"] and "selector" not in props["policy"]["properties"]
    pspec = docs["MCPToolPolicy"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    issuer = pspec["properties"]["auth"]["properties"]["issuers"]["items"]
    assert "exactly one of" in issuer["x-kubernetes-validations"][0]["message"]


def test_unknown_fields_are_kept_nowhere_without_need():
    text = "".join(render_crd_files().values())
    assert "x-kubernetes-preserve-unknown-fields" not in text
    assert "&id" not in text and "*id" not in text
