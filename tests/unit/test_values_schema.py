"""charts/toolmesh/values.schema.json is what scripts/values_schema.py makes of values.yaml, and helm refuses what it
forbids: a wrong type, a key a closed map does not list, a value outside an enum or a bound."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from helpers import ROOT
from helpers.chart import CHART, template

SCRIPT = ROOT / "scripts" / "values_schema.py"


def _generator():
    spec = importlib.util.spec_from_file_location("values_schema", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


values_schema = _generator()


def _schema(text: str) -> dict:
    return json.loads(values_schema.render_schema(text))


def test_committed_schema_is_the_generated_one():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, (result.stderr or result.stdout) + "\nrun: make chart-schema"


def test_check_fails_when_values_yaml_changes():
    values = (CHART / "values.yaml").read_text()
    committed = (CHART / "values.schema.json").read_text()
    assert values_schema.render_schema(values) == committed
    changed = values.replace("  # +schema:enum=[\"Fail\", \"Ignore\"]\n", "", 1)
    assert changed != values
    assert values_schema.render_schema(changed) != committed


def test_types_follow_the_defaults_and_comments_become_descriptions():
    schema = _schema(
        "# -- A name.\nname: demo\n"
        "# How many.\ncount: 3\n"
        "# A ratio.\nratio: 0.5\n"
        "# On or off.\nenabled: true\n"
        "# Tags.\ntags: [a, b]\n"
        "# Nothing yet.\nextra: []\n"
        "# Free labels.\nlabels: {}\n"
        "# A nested map, spread\n# over two lines.\nnested:\n  # Inner value.\n  inner: x\n")
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["name"] == {"description": "A name.", "type": "string"}
    assert props["count"]["type"] == "integer" and props["ratio"]["type"] == "number"
    assert props["enabled"]["type"] == "boolean"
    assert props["tags"] == {"description": "Tags.", "type": "array", "items": {"type": "string"}}
    assert props["extra"] == {"description": "Nothing yet.", "type": "array"}
    assert props["labels"] == {"description": "Free labels.", "type": "object"}
    assert props["nested"]["description"] == "A nested map, spread over two lines."
    assert props["nested"]["additionalProperties"] is False
    assert props["nested"]["properties"]["inner"] == {"description": "Inner value.", "type": "string"}


def test_annotations_set_keywords():
    schema = _schema(
        "# The header.\n# +schema:title=demo values\n# +schema:definitions.port={\"type\": \"integer\"}\n\n"
        "# A port.\n# +schema:$ref=#/definitions/port\nport: 80\n"
        "# Either.\n# +schema:type=[\"integer\", \"string\"]\n# +schema:pattern=^[0-9]+%$\nshare: 1\n"
        "# Policy.\n# +schema:enum=[\"A\", \"B\"]\npolicy: A\n"
        "# Open map with one more known key.\n# +schema:additionalProperties=true\n"
        "# +schema:properties.more={\"const\": false}\nopen:\n  # Known.\n  known: 1\n")
    assert schema["title"] == "demo values" and schema["description"] == "The header."
    assert schema["definitions"] == {"port": {"type": "integer"}}
    props = schema["properties"]
    assert props["port"] == {"description": "A port.", "$ref": "#/definitions/port"}
    assert props["share"] == {"description": "Either.", "type": ["integer", "string"], "pattern": "^[0-9]+%$"}
    assert props["policy"] == {"description": "Policy.", "type": "string", "enum": ["A", "B"]}
    assert props["open"]["additionalProperties"] is True
    assert props["open"]["properties"] == {"known": {"description": "Known.", "type": "integer"},
                                           "more": {"const": False}}


def test_keys_of_a_map_with_a_value_schema_take_that_schema():
    schema = _schema("# Limits.\n# +schema:additionalProperties={\"type\": \"string\", \"minLength\": 1}\n"
                     "limits:\n  # Memory.\n  memory: 1Gi\n  # CPU, a number.\n  # +schema:type=number\n  cpu: 1\n")
    limits = schema["properties"]["limits"]
    assert limits["additionalProperties"] == {"type": "string", "minLength": 1}
    assert limits["properties"]["memory"] == {"description": "Memory.", "type": "string", "minLength": 1}
    assert limits["properties"]["cpu"] == {"description": "CPU, a number.", "type": "number"}


@pytest.mark.parametrize(("text", "complaint"), [
    ("name: demo\n", "values.yaml:1: `name` has no description"),
    ("# +schema:minimum=1\ncount: 1\n", "values.yaml:2: `count` has no description"),
    ("# How many.\n# +schema:minimun=1\ncount: 1\n", "unknown schema keyword 'minimun'"),
    ("# How many.\n# +schema:minimum 1\ncount: 1\n", "not `# +schema:KEYWORD=VALUE`"),
    ("# How many.\ncount: 1\n\n# +schema:minimum=1\n\n# Name.\nname: x\n", "values.yaml:4: no value follows"),
    ("# Nothing.\nnothing: null\n", "annotate it with `# +schema:type=...`"),
])
def test_generator_refuses_what_it_cannot_document(text: str, complaint: str):
    with pytest.raises(values_schema.ValuesError) as caught:
        values_schema.render_schema(text)
    assert complaint in str(caught.value)


@pytest.mark.parametrize(("setting", "complaint"), [
    ("registry.replicas=two", "at '/registry/replicas': got string, want integer"),
    ("webhook.enabled=yes", "at '/webhook/enabled': got string, want boolean"),
    ("operator.replcas=1", "at '/operator': additional properties 'replcas' not allowed"),
    ("webhook.certManager.issuerRef.namespace=x", "additional properties 'namespace' not allowed"),
    ("registry.service.type=ExternalName", "at '/registry/service/type': value must be one of"),
    ("podSecurityContext.seccompProfile.type=Unconfined", "at '/podSecurityContext/seccompProfile/type'"),
    ("operator.resources.limits.cpu=lots", "at '/operator/resources/limits/cpu'"),
    ("securityContext.privileged=true", "at '/securityContext/privileged'"),
    ("securityContext.capabilities.add[0]=NET_ADMIN", "at '/securityContext/capabilities/add'"),
    ("sidecar.defaultPolicy.spec.rateLimit.burst=0", "at '/sidecar/defaultPolicy/spec/rateLimit/burst'"),
    ("webhook.certManager.duration=1year", "at '/webhook/certManager/duration'"),
    ("fullnameOverride=Team_A", "at '/fullnameOverride'"),
])
def test_helm_refuses_a_wrong_value(setting: str, complaint: str):
    result = template("--set", setting, check=False)
    assert result.returncode != 0, f"{setting} was accepted"
    assert complaint in result.stderr, result.stderr


def test_helm_lint_refuses_a_values_file_of_the_wrong_shape(tmp_path):
    values = tmp_path / "wrong.values.yaml"
    values.write_text("registry:\n  heartbeatInterval: soon\n  service:\n    type: ExternalName\nunknown: 1\n")
    from helpers.chart import KUBE_VERSION, helm

    result = helm("lint", str(CHART), "--kube-version", KUBE_VERSION, "-f", str(values), check=False)
    assert result.returncode != 0
    for complaint in ("/registry/heartbeatInterval", "/registry/service/type", "'unknown' not allowed"):
        assert complaint in result.stdout + result.stderr, result.stdout + result.stderr


def test_helm_accepts_what_the_annotations_allow(tmp_path):
    values = tmp_path / "allowed.values.yaml"
    values.write_text(
        "registry:\n  heartbeatInterval: 2.5\n"
        "operator:\n  podDisruptionBudget:\n    maxUnavailable: 50%\n"
        "  resources:\n    requests:\n      cpu: 1\n    limits:\n      ephemeral-storage: 1Gi\n"
        "podSecurityContext:\n  fsGroup: 10001\n"
        "sidecar:\n  defaultPolicy:\n    spec:\n      rateLimit:\n        requestsPerSecond: 0.5\n"
        "      cache:\n        ttlSeconds: 30\n")
    template("-f", str(values))
