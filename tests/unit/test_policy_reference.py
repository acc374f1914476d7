"""docs/policy-reference.md is what scripts/policy_reference.py makes of the policy models, and every field is documented."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "policy_reference.py"


def test_reference_is_up_to_date():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, (result.stderr or result.stdout) + "\nrun: .venv/bin/python scripts/policy_reference.py"


def test_every_policy_field_has_a_description_and_a_section():
    from toolmesh.api.policy import MCPToolPolicySpec

    text = (ROOT / "docs" / "policy-reference.md").read_text()
    undocumented = []
    seen: set[type] = set()

    def visit(model) -> None:
        if model in seen:
            return
        seen.add(model)
        assert f'<a id="{model.__name__.lower()}"></a>' in text, model.__name__
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                undocumented.append(f"{model.__name__}.{name}")
            assert f"| `{field.alias or name}`" in text
            for child in _models(field.annotation):
                visit(child)

    visit(MCPToolPolicySpec)
    assert not undocumented, f"fields without a docstring: {undocumented}"
    for section in ("auth", "authorization", "rateLimit", "cache", "budget", "retry", "circuitBreaker", "timeouts"):
        assert f"| `{section}` |" in text


def _models(annotation) -> list[type]:
    import inspect
    import typing

    from pydantic import BaseModel

    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _models(arg)
    return found
