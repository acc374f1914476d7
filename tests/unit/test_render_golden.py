"""Golden tests of the pure renderers: tests/golden/<case>/input.yaml renders to expected.yaml.

An MCPServer input (with the MCPToolPolicies beside it) renders to its manifests and status; a Pod input
renders to the pod after sidecar injection. Regenerate after an intended change with
TOOLMESH_REGEN_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import os

import pytest
import yaml

from helpers import ROOT
from toolmesh.operator.inject import options_from_pod, inject_pod
from toolmesh.operator.merge import PolicySource
from toolmesh.operator.render import OperatorConfig, render_server, server_status

GOLDEN = ROOT / "tests" / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "input.yaml").exists())
CONFIG = OperatorConfig(sidecar_image="ghcr.io/toolmesh/toolmesh:0.1.0",
                        registry_url="http://toolmesh-registry.toolmesh-system.svc:7401")
NOW = "2026-01-01T00:00:00Z"


def render_case(case: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((GOLDEN / case / "input.yaml").read_text()) if d]
    first = docs[0]
    if first["kind"] == "Pod":
        options = options_from_pod(first, image=CONFIG.sidecar_image, registry_url=CONFIG.registry_url)
        return [inject_pod(first, options)]
    policies = [PolicySource.from_body(d) for d in docs[1:]]
    rendered = render_server(first, policies, CONFIG)
    status = server_status(first, rendered, None, NOW)
    return [*rendered.manifests, {"status": status, "winners": rendered.policy.winners}]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the rendered policy file) as literal blocks, so a diff reads like the file."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def dump(docs: list[dict]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str):
    expected_path = GOLDEN / case / "expected.yaml"
    actual = dump(render_case(case))
    if os.environ.get("TOOLMESH_REGEN_GOLDEN"):
        expected_path.write_text(actual)
    assert expected_path.exists(), f"no expected.yaml for {case}: run with TOOLMESH_REGEN_GOLDEN=1"
    assert actual == expected_path.read_text(), f"{case} renders differently from expected.yaml"


def test_every_case_has_expected_output():
    assert len(CASES) >= 5
    assert all((GOLDEN / c / "expected.yaml").exists() for c in CASES)
