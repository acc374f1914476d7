"""The Helm chart offline: lint, golden renderings of a few value sets, a schema that refuses wrong values,
CRDs and webhook configuration in step with the code, and the security settings every pod must have."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from helpers import ROOT
from helpers.chart import CHART, GOLDEN, find, helm, objects, template

CASES = sorted(p.name.removesuffix(".values.yaml") for p in GOLDEN.glob("*.values.yaml"))


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_is_clean(case: str):
    result = helm("lint", "--strict", str(CHART), "--kube-version", "1.36.0", "-f", str(GOLDEN / f"{case}.values.yaml"))
    assert "0 chart(s) failed" in result.stdout


def test_notes_name_files_that_exist():
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    paths = re.findall(r"-f (examples/\S+)", notes)
    assert paths and all((ROOT / p).exists() for p in paths), paths


@pytest.mark.parametrize("case", CASES)
def test_rendering_matches_golden(case: str):
    """Regenerate with TOOLMESH_REGEN_GOLDEN=1 after a deliberate change, and read the diff."""
    rendered = template("-f", str(GOLDEN / f"{case}.values.yaml")).stdout
    golden = GOLDEN / f"{case}.yaml"
    if os.environ.get("TOOLMESH_REGEN_GOLDEN"):
        golden.write_text(rendered)
    assert golden.exists(), f"no golden file {golden}: run with TOOLMESH_REGEN_GOLDEN=1"
    assert rendered == golden.read_text()


@pytest.mark.parametrize(("setting", "complaint"), [
    ("operator.replicas=2", "/operator/replicas"),
    ("webhook.failurePolicy=Sometimes", "/webhook/failurePolicy"),
    ("webhook.timeoutSeconds=60", "/webhook/timeoutSeconds"),
    ("webhook.policyValidation.failurePolicy=Sometimes", "/webhook/policyValidation/failurePolicy"),
    ("webhook.policyValidation.failurePolicy=fail", "/webhook/policyValidation/failurePolicy"),
    ("webhook.policyValidation.timeout=3", "timeout"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ("registry.replcas=2", "replcas"),
    ("registry.port=70000", "/registry/port"),
    ("registry.service.sessionAffinity=Sticky", "/registry/service/sessionAffinity"),
    ("registry.missedHeartbeats=0", "/registry/missedHeartbeats"),
    ("podSecurityContext.runAsNonRoot=false", "/podSecurityContext/runAsNonRoot"),
    ("operator.watchNamespaces[0]=Team_A", "/operator/watchNamespaces/0"),
    ("operator.resources.requests.memory=lots", "/operator/resources/requests/memory"),
    ("webhook.certManager.issuerRef.kind=Vault", "/webhook/certManager/issuerRef/kind"),
    ("sidecar.defaultPolicy.spec.ratelimit.burst=3", "ratelimit"),
    ("state.redis.url=http://redis:6379", "/state/redis/url"),
    ("state.redis.url=redis://:secret@redis:6379", "/state/redis/url"),  # a password would be in every pod spec
    ("state.redis.existingSecret=Redis_Auth", "/state/redis/existingSecret"),
    ("state.redis.existingSecret=redis-auth", "state.redis.existingSecret needs state.redis.url"),
])
def test_schema_refuses_wrong_values(setting: str, complaint: str):
    result = template("--set", setting, check=False)
    assert result.returncode != 0, f"{setting} was accepted"
    assert complaint in result.stderr, result.stderr


def test_crds_are_the_generated_ones():
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    shipped = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert shipped == generated, "run `make crds`: it copies crds/*.yaml into charts/toolmesh/crds/"
    for name in generated:
        assert (CHART / "crds" / name).read_text() == (ROOT / "crds" / name).read_text(), (
            f"charts/toolmesh/crds/{name} drifted from crds/{name}: run `make crds`")


def test_webhook_configuration_is_the_operators():
    """The chart owns the object; the operator patches its caBundle in. Both must describe the same webhooks."""
    from toolmesh.operator.webhook import CONFIGURATION_NAME, WebhookEndpoint, render_webhook_configuration

    docs = objects(template().stdout)
    [chart] = find(docs, "MutatingWebhookConfiguration")
    operator = render_webhook_configuration(
        WebhookEndpoint(service_name="toolmesh-operator", service_namespace="toolmesh-system"), b"ca",
        "toolmesh-system")
    for webhook in operator["webhooks"]:
        del webhook["clientConfig"]["caBundle"]
    assert chart["metadata"]["name"] == CONFIGURATION_NAME
    assert chart["webhooks"] == operator["webhooks"]
    [deployment] = find(docs, "Deployment", "toolmesh-operator")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--webhook-service=toolmesh-operator" in args
    [service] = find(docs, "Service", "toolmesh-operator")
    assert service["spec"]["ports"][0]["port"] == operator["webhooks"][0].get("clientConfig", {}).get("service", {}).get("port", 443)


@pytest.mark.parametrize("values, served", [
    ((), {}),
    (("--set-json", 'operator.watchNamespaces=["team-b","team-a"]'), {"namespaces": ["team-a", "team-b"]}),
    (("--set-json", 'operator.namespaceSelector={"toolmesh.io/managed":"yes"}'),
     {"namespace_selector": {"toolmesh.io/managed": "yes"}}),
    (("--set", "webhook.policyValidation.failurePolicy=Fail", "--set", "webhook.timeoutSeconds=4"),
     {"failure_policy": "Fail", "timeout_seconds": 4}),
], ids=["default", "watch-namespaces", "namespace-selector", "fail-and-timeout"])
def test_validating_configuration_is_the_operators(values, served):
    """The chart's ValidatingWebhookConfiguration is the one the operator renders for the same namespaces, and the
    operator is told the same failurePolicy and may patch that object."""
    from toolmesh.operator.validation import VALIDATING_CONFIGURATION_NAME, render_validating_configuration
    from toolmesh.operator.webhook import WebhookEndpoint

    docs = objects(template(*values).stdout)
    [chart] = find(docs, "ValidatingWebhookConfiguration")
    operator = render_validating_configuration(
        WebhookEndpoint(service_name="toolmesh-operator", service_namespace="toolmesh-system"), b"ca",
        "toolmesh-system", **served)
    for webhook in operator["webhooks"]:
        del webhook["clientConfig"]["caBundle"]
    assert chart["metadata"]["name"] == VALIDATING_CONFIGURATION_NAME
    assert chart["webhooks"] == operator["webhooks"]
    [deployment] = find(docs, "Deployment", "toolmesh-operator")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--validation-failure-policy={served.get('failure_policy', 'Ignore')}" in args
    [role] = find(docs, "ClusterRole", "toolmesh-operator")
    assert {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["validatingwebhookconfigurations"],
            "resourceNames": [VALIDATING_CONFIGURATION_NAME], "verbs": ["get", "patch"]} in role["rules"]


def test_cert_manager_injects_the_ca_of_both_webhook_configurations():
    docs = objects(template("-f", str(GOLDEN / "cert-manager.values.yaml")).stdout)
    annotations = {d["kind"]: d["metadata"].get("annotations") for d in docs if d["kind"].endswith("WebhookConfiguration")}
    assert annotations == {kind: {"cert-manager.io/inject-ca-from": "toolmesh-system/toolmesh-webhook"}
                           for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")}
    assert not find(objects(template("--set", "webhook.enabled=false").stdout), "ValidatingWebhookConfiguration")


@pytest.mark.parametrize("case", CASES)
def test_every_pod_is_locked_down_and_sized(case: str):
    docs = objects(template("-f", str(GOLDEN / f"{case}.values.yaml")).stdout)
    deployments = find(docs, "Deployment")
    assert {d["metadata"]["name"].rsplit("-", 1)[1] for d in deployments} == {"operator", "registry"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_registry_scales_and_sidecars_find_it():
    docs = objects(template("--set", "registry.replicas=3").stdout)
    [registry] = find(docs, "Deployment", "toolmesh-registry")
    assert registry["spec"]["replicas"] == 3
    assert "--kube" in registry["spec"]["template"]["spec"]["containers"][0]["args"]
    [operator] = find(docs, "Deployment", "toolmesh-operator")
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    # The operator's own default, so a chart install and a bare `toolmesh operator` agree.
    from toolmesh.operator.render import OperatorConfig

    assert f"--registry-url={OperatorConfig.registry_url}" in args
    assert f"--sidecar-image={OperatorConfig.sidecar_image}" in args


def test_registry_role_is_read_mcpservers_write_status_review_tokens():
    docs = objects(template().stdout)
    [role] = find(docs, "ClusterRole", "toolmesh-registry")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert granted == {
        ("toolmesh.io", "mcpservers", "get"), ("toolmesh.io", "mcpservers", "list"),
        ("toolmesh.io", "mcpservers", "watch"), ("toolmesh.io", "mcpservers/status", "patch"),
        ("authentication.k8s.io", "tokenreviews", "create"),
    }


def test_namespaced_operator_gets_roles_not_a_clusterrole_for_what_it_reconciles():
    docs = objects(template("-f", str(GOLDEN / "namespaced.values.yaml")).stdout)
    [cluster_role] = find(docs, "ClusterRole", "toolmesh-operator")
    assert not any("mcpservers" in rule["resources"] or "deployments" in rule["resources"]
                   for rule in cluster_role["rules"])
    roles = [r for r in find(docs, "Role", "toolmesh-operator")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    [operator] = find(docs, "Deployment", "toolmesh-operator")
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    [policy] = find(docs, "MCPToolPolicy")
    assert policy["metadata"]["namespace"] == "team-a" and policy["spec"]["selector"] == {}


def test_default_policy_is_a_valid_policy():
    from toolmesh.api.policy import PolicyFile

    docs = objects(template("-f", str(GOLDEN / "namespaced.values.yaml")).stdout)
    [policy] = find(docs, "MCPToolPolicy")
    spec = PolicyFile.parse(policy)
    assert spec.rateLimit is not None and spec.rateLimit.requestsPerSecond == 20


def test_every_value_is_documented_by_a_comment_above_it():
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z][\w-]*:", line):
            above = lines[number - 1].strip() if number else ""
            if not above.startswith("#"):
                undocumented.append(f"values.yaml:{number + 1}: {line.strip()}")
    assert not undocumented, "\n".join(undocumented)


def test_every_value_has_a_schema():
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(values: dict, node: dict, path: str) -> list[str]:
        missing = []
        for key, value in values.items():
            props = node.get("properties", {})
            if key not in props:
                if node.get("additionalProperties", True) is False or "properties" in node:
                    missing.append(f"{path}.{key}")
                continue
            child = props[key]
            if "$ref" in child:
                child = schema["definitions"][child["$ref"].rsplit("/", 1)[1]]
            if isinstance(value, dict) and "properties" in child:
                missing += walk(value, child, f"{path}.{key}")
        return missing

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert walk(values, schema, "") == []
