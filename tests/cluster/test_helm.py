"""`helm install` of charts/toolmesh on the real control plane, then the operator and registry run under the chart's own RBAC.

The operator and registry run out of cluster as subprocesses (containers never run here), each
with a kubeconfig holding a token of the ServiceAccount the chart created — never admin — and
must do their real work with it: reconcile an MCPServer, write status, set up the webhook, accept
a heartbeat. `kubectl auth can-i --as` checks what each may and may not do. Upgrade and uninstall
run last: changed values land, the operator's certificate survives, and nothing but the CRDs remains.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, TOOLMESH, free_port, port_open, running, wait_until
from helpers.chart import CHART
from helpers.operator_proc import WEBHOOK_CONFIGURATION, condition, get_json
from helpers.registry_procs import beating

pytestmark = pytest.mark.cluster

RELEASE = "toolmesh"
IMAGE = "ghcr.io/toolmesh/toolmesh:0.1.0"


@pytest.fixture(scope="module")
def release(cluster) -> str:
    """The chart installed as `toolmesh` into a fresh namespace; returns the namespace. Uninstalled at the end."""
    namespace = f"toolmesh-{uuid.uuid4().hex[:6]}"
    # An operator run by an earlier test may have left its webhook configuration; the chart owns that name.
    cluster.kubectl("delete", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "--ignore-not-found")
    installed = cluster.helm("install", RELEASE, str(CHART), "--namespace", namespace, "--create-namespace",
                             "--wait=false", timeout=180)
    assert "STATUS: deployed" in installed.stdout
    try:
        yield namespace
    finally:
        cluster.helm("uninstall", RELEASE, "--namespace", namespace, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def service_account(namespace: str, component: str) -> str:
    return f"system:serviceaccount:{namespace}:{RELEASE}-{component}"


def kubeconfig_for(cluster, namespace: str, component: str, path: Path) -> dict[str, str]:
    """Environment whose KUBECONFIG authenticates as the chart's ServiceAccount for `component`, not as admin."""
    token = cluster.kubectl("create", "token", f"{RELEASE}-{component}", "-n", namespace, "--duration", "1h").stdout.strip()
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": component,
        "clusters": [{"name": "test", "cluster": {"server": cluster.server, "certificate-authority": str(cluster.ca_cert)}}],
        "users": [{"name": component, "user": {"token": token}}],
        "contexts": [{"name": component, "context": {"cluster": "test", "user": component, "namespace": namespace}}],
    }
    path.write_text(json.dumps(config))
    return dict(cluster.env, KUBECONFIG=str(path))


def can_i(cluster, who: str, *args: str) -> bool:
    result = cluster.kubectl("auth", "can-i", *args, f"--as={who}", check=False)
    return result.stdout.strip() == "yes"


def test_every_object_is_accepted_and_the_release_is_deployed(cluster, release):
    status = cluster.helm("status", RELEASE, "-n", release, "-o", "json")
    assert json.loads(status.stdout)["info"]["status"] == "deployed"
    manifest = [d for d in yaml.safe_load_all(cluster.helm("get", "manifest", RELEASE, "-n", release).stdout) if d]
    for doc in manifest:
        meta = doc["metadata"]
        args = [doc["kind"].lower(), meta["name"]] + (["-n", meta["namespace"]] if meta.get("namespace") else [])
        assert get_json(cluster, *args) is not None, f"{doc['kind']} {meta['name']} is not in the cluster"
    kinds = {d["kind"] for d in manifest}
    assert {"Deployment", "Service", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
            "PodDisruptionBudget", "MutatingWebhookConfiguration", "Secret"} <= kinds
    for crd in ("mcpservers.toolmesh.io", "mcptoolpolicies.toolmesh.io"):
        assert get_json(cluster, "crd", crd) is not None
    registry = get_json(cluster, "deployment", f"{RELEASE}-registry", "-n", release)
    assert registry["spec"]["replicas"] == 2
    notes = cluster.helm("get", "notes", RELEASE, "-n", release).stdout
    assert "kubectl apply -f examples/quickstart/" in notes and "kubectl get mcpservers" in notes


def test_the_webhook_points_at_the_operator_service(cluster, release, namespace):
    config = get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
    for webhook in config["webhooks"]:
        assert webhook["clientConfig"]["service"] == {"name": f"{RELEASE}-operator", "namespace": release,
                                                      "port": 443, "path": "/inject-pods"}
        assert release in webhook["namespaceSelector"]["matchExpressions"][-1]["values"], "its own namespace is skipped"
    service = get_json(cluster, "service", f"{RELEASE}-operator", "-n", release)
    assert service["spec"]["ports"][0]["port"] == 443
    # The API server itself follows the configuration: a labelled pod is sent to that Service, which has
    # no ready endpoint here, so with failurePolicy Fail the pod is refused, naming the Service.
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "wants-a-sidecar", "labels": {"toolmesh.io/inject": "true"}},
           "spec": {"containers": [{"name": "server", "image": "example.org/mcp:1"}]}}
    refused = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False)
    assert refused.returncode != 0
    assert "pods.inject.toolmesh.io" in refused.stderr and f"{RELEASE}-operator.{release}.svc" in refused.stderr


OPERATOR_MAY = [
    ("list", "mcpservers", "-A"), ("watch", "mcpservers", "-A"), ("patch", "mcpservers", "-A"),
    ("patch", "mcpservers", "--subresource=status", "-A"), ("patch", "mcptoolpolicies", "--subresource=status", "-A"),
    ("list", "mcptoolpolicies", "-A"), ("patch", "deployments.apps", "-A"), ("watch", "deployments.apps", "-A"),
    ("patch", "services", "-A"), ("patch", "configmaps", "-A"), ("patch", "serviceaccounts", "-A"),
    ("create", "deployments.apps", "-A"), ("create", "services", "-A"), ("create", "configmaps", "-A"),
    ("create", "serviceaccounts", "-A"), ("create", "events", "-A"),
    ("update", "mcpservers", "--subresource=finalizers", "-A"),
    ("patch", "mutatingwebhookconfigurations/toolmesh-sidecar-injector"),
]
OPERATOR_MAY_NOT = [
    ("delete", "deployments.apps", "-A"), ("create", "pods", "-A"), ("list", "secrets", "-A"), ("create", "secrets", "-A"),
    ("watch", "secrets", "-n", "default"), ("patch", "secrets", "-n", "default"), ("delete", "mcpservers", "-A"), ("patch", "mutatingwebhookconfigurations/other"),
    ("patch", "validatingwebhookconfigurations", "-A"), ("create", "mutatingwebhookconfigurations"), ("create", "clusterroles"), ("patch", "customresourcedefinitions"),
    ("create", "serviceaccounts", "--subresource=token", "-A"), ("patch", "nodes"),
]
REGISTRY_MAY = [
    ("get", "mcpservers", "-A"), ("list", "mcpservers", "-A"), ("watch", "mcpservers", "-A"),
    ("patch", "mcpservers", "--subresource=status", "-A"), ("create", "tokenreviews.authentication.k8s.io"),
]
REGISTRY_MAY_NOT = [
    ("patch", "mcpservers", "-A"), ("update", "mcpservers", "-A"), ("delete", "mcpservers", "-A"),
    ("create", "mcpservers", "-A"), ("get", "mcptoolpolicies", "-A"), ("get", "secrets", "-A"), ("list", "pods", "-A"),
    ("patch", "deployments.apps", "-A"), ("create", "serviceaccounts", "--subresource=token", "-A"), ("create", "events", "-A"),
    ("patch", "mutatingwebhookconfigurations"),
]


def test_rbac_is_enough_and_no_more(cluster, release):
    operator, registry = service_account(release, "operator"), service_account(release, "registry")
    wrong = []
    for who, may, may_not in ((operator, OPERATOR_MAY, OPERATOR_MAY_NOT), (registry, REGISTRY_MAY, REGISTRY_MAY_NOT)):
        wrong += [f"{who} cannot {' '.join(c)}" for c in may if not can_i(cluster, who, *c)]
        wrong += [f"{who} can {' '.join(c)}" for c in may_not if can_i(cluster, who, *c)]
    # The webhook certificate: its own Secret in its own namespace, no other. Other Secrets it may only get, one by
    # name (the one a policy's secretRef names), never list or change.
    if not can_i(cluster, operator, "patch", "secrets/toolmesh-webhook-tls", "-n", release):
        wrong.append(f"{operator} cannot patch its webhook Secret")
    if can_i(cluster, operator, "patch", "secrets/other", "-n", release):
        wrong.append(f"{operator} can change other Secrets of {release}")
    if not can_i(cluster, operator, "get", "secrets/jwt-signing", "-n", "default"):
        wrong.append(f"{operator} cannot check a Secret a policy names")
    assert not wrong, "\n".join(wrong)


def test_operator_and_registry_work_under_the_charts_rbac(cluster, release, namespace, tmp_path):
    operator_env = kubeconfig_for(cluster, release, "operator", tmp_path / "operator.kubeconfig")
    registry_env = kubeconfig_for(cluster, release, "registry", tmp_path / "registry.kubeconfig")
    webhook_port, registry_port = free_port(), free_port()
    operator_log, registry_log = tmp_path / "operator.log", tmp_path / "registry.log"
    operator_cmd = [TOOLMESH, "operator", "--operator-namespace", release, "--webhook-host", "127.0.0.1",
                    "--webhook-port", str(webhook_port), "--webhook-service", f"{RELEASE}-operator",
                    "--sidecar-image", IMAGE, "--registry-url", f"http://{RELEASE}-registry.{release}.svc:7401"]
    registry_cmd = [TOOLMESH, "registry", "--kube", "--listen", f"127.0.0.1:{registry_port}",
                    "--heartbeat-interval", "0.5"]
    with running(operator_cmd, env=operator_env, log_path=operator_log, stop_timeout=15) as operator, \
            running(registry_cmd, env=registry_env, log_path=registry_log) as registry:
        def logs() -> str:
            events = cluster.kubectl("get", "events", "-n", namespace, check=False).stdout
            return (f"operator log:\n{operator_log.read_text(errors='replace')[-3000:]}\n"
                    f"registry log:\n{registry_log.read_text(errors='replace')[-2000:]}\nevents:\n{events[-3000:]}")

        def wait_for(predicate, timeout: float, what: str):
            try:
                return cluster.wait_for(predicate, timeout=timeout, what=what)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{logs()}") from None

        wait_until(lambda: operator.poll() is not None or port_open(webhook_port), timeout=60,
                   what="the operator's webhook to listen")
        assert operator.poll() is None, logs()
        # The webhook set-up ran under the chart's RBAC: certificate in the chart's Secret, caBundle patched in.
        secret = get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", release)
        assert secret["data"]["tls.crt"], logs()
        config = get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
        assert all(w["clientConfig"].get("caBundle") == secret["data"]["ca.crt"] for w in config["webhooks"])

        # The README's policy step, then its server step.
        cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "policies" / "authorization.yaml"))
        server = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": "echo"},
                  "spec": {"image": "example.org/echo-mcp:1", "transport": "streamable-http", "port": 8080}}
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(server))

        # Whether Ready turns True depends on the fake Node's pods, not on RBAC: what the operator itself
        # must be allowed to write is the status of this generation with its conditions and endpoint.
        def reconciled():
            body = get_json(cluster, "mcpserver", "echo", "-n", namespace)
            status = (body or {}).get("status") or {}
            applied = condition(body, "PolicyApplied")
            return (status.get("observedGeneration") == body["metadata"]["generation"] and condition(body, "Ready")
                    and applied and applied["status"] == "True" and body)

        body = wait_for(reconciled, timeout=90, what="MCPServer echo reconciled under the chart's RBAC")
        assert body["status"]["appliedPolicies"] == ["authorization"]

        def policy_reported():
            policy = get_json(cluster, "mcptoolpolicy", "authorization", "-n", namespace)
            accepted = condition(policy, "Accepted")
            return accepted and accepted["status"] == "True" and policy["status"].get("servers") == ["echo"]

        wait_for(policy_reported, timeout=30, what="the policy's status written under the chart's RBAC")
        assert "authorization" in cluster.kubectl("get", "mcptoolpolicies", "-n", namespace).stdout
        assert body["status"]["endpoint"] == f"http://echo.{namespace}.svc:7400/mcp"
        for kind, name in (("deployment", "echo"), ("service", "echo"), ("serviceaccount", "echo"),
                           ("configmap", "echo-policy")):
            assert get_json(cluster, kind, name, "-n", namespace) is not None, kind
        deployment = get_json(cluster, "deployment", "echo", "-n", namespace)
        sidecar = deployment["spec"]["template"]["spec"]["initContainers"][0]
        assert sidecar["image"] == IMAGE
        assert f"http://{RELEASE}-registry.{release}.svc:7401" in sidecar["args"]

        wait_until(lambda: registry.poll() is not None or port_open(registry_port), timeout=30, what="the registry")
        assert registry.poll() is None, logs()
        token = cluster.token_for(namespace, "echo", "toolmesh-registry")
        beat = {"server": "echo", "endpoint": "http://127.0.0.1:1/mcp", "tools": [{"name": "echo"}]}

        async def beat_until_written():
            async with beating(f"http://127.0.0.1:{registry_port}", beat, interval=0.2, secret=token):
                def written():
                    status = get_json(cluster, "mcpserver", "echo", "-n", namespace)["status"]
                    healthy = condition({"status": status}, "Healthy")
                    return status.get("toolCount") == 1 and healthy and healthy["status"] == "True"

                wait_for(written, timeout=30, what="the registry to write MCPServer.status")

        import asyncio

        asyncio.run(beat_until_written())
        assert operator.poll() is None and registry.poll() is None, logs()
    for log in (operator_log, registry_log):
        text = log.read_text(errors="replace")
        assert "Forbidden" not in text and " 403" not in text, f"{log.name} hit RBAC:\n{text[-3000:]}"


def test_upgrade_changes_values_and_uninstall_leaves_only_the_crds(cluster, release):
    secret_before = get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", release)["data"]
    ca_before = get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION)["webhooks"][0]["clientConfig"].get("caBundle")
    cluster.helm("upgrade", RELEASE, str(CHART), "-n", release, "--reuse-values", "--set", "registry.replicas=3",
                 "--set", "webhook.failurePolicy=Ignore", "--set", "image.tag=0.1.1", timeout=180)
    registry = get_json(cluster, "deployment", f"{RELEASE}-registry", "-n", release)
    assert registry["spec"]["replicas"] == 3
    assert registry["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/toolmesh/toolmesh:0.1.1"
    operator = get_json(cluster, "deployment", f"{RELEASE}-operator", "-n", release)
    assert "--sidecar-image=ghcr.io/toolmesh/toolmesh:0.1.1" in operator["spec"]["template"]["spec"]["containers"][0]["args"]
    config = get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
    assert {w["failurePolicy"] for w in config["webhooks"]} == {"Ignore"}
    # What the operator wrote is not wiped by the upgrade: its certificate and the caBundle it patched in.
    assert get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", release)["data"] == secret_before
    assert config["webhooks"][0]["clientConfig"].get("caBundle") == ca_before

    cluster.helm("uninstall", RELEASE, "-n", release, "--wait", timeout=180)
    selector = f"app.kubernetes.io/instance={RELEASE}"
    left = cluster.kubectl("get", "all,serviceaccounts,secrets,configmaps,roles,rolebindings,poddisruptionbudgets",
                           "-n", release, "-l", selector, "-o", "name").stdout.split()
    left += cluster.kubectl("get", "clusterroles,clusterrolebindings,mutatingwebhookconfigurations", "-l", selector,
                            "-o", "name").stdout.split()
    assert left == []
    assert get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION) is None
    assert cluster.kubectl("get", "secrets", "-n", release, "-o", "name").stdout.split() == [], "no Secret left behind"
    for crd in ("mcpservers.toolmesh.io", "mcptoolpolicies.toolmesh.io"):
        assert get_json(cluster, "crd", crd) is not None, "CRDs stay, as Helm's convention is"


def _stand_in_crd(plural: str, kind: str) -> dict:
    """A schemaless stand-in for one of cert-manager's CRDs: enough for the API server to store the chart's objects."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.cert-manager.io"},
        "spec": {"group": "cert-manager.io", "scope": "Namespaced",
                 "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
                 "versions": [{"name": "v1", "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": {"type": "object",
                                                              "x-kubernetes-preserve-unknown-fields": True}}}]},
    }


def test_with_cert_manager_the_operator_serves_the_issued_certificate_and_needs_no_secret_rights(cluster, tmp_path):
    import ssl

    for plural, kind in (("certificates", "Certificate"), ("issuers", "Issuer")):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(_stand_in_crd(plural, kind)))
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{plural}.cert-manager.io", "--timeout=30s")
    namespace = f"toolmesh-cm-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("delete", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "--ignore-not-found")
    cluster.helm("install", RELEASE, str(CHART), "-n", namespace, "--create-namespace",
                 "--set", "webhook.certManager.enabled=true", timeout=180)
    try:
        certificate = get_json(cluster, "certificate.cert-manager.io", f"{RELEASE}-webhook", "-n", namespace)
        service_host = f"{RELEASE}-operator.{namespace}.svc"
        assert service_host in certificate["spec"]["dnsNames"]
        assert certificate["spec"]["issuerRef"]["name"] == f"{RELEASE}-selfsigned"
        config = get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
        assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{namespace}/{RELEASE}-webhook"
        operator_sa = service_account(namespace, "operator")
        assert not can_i(cluster, operator_sa, "patch", "secrets/toolmesh-webhook-tls", "-n", namespace)
        assert not can_i(cluster, operator_sa, "patch", "mutatingwebhookconfigurations/toolmesh-sidecar-injector")

        # What cert-manager would put in the Secret the operator mounts: a certificate for the Service name.
        cert_dir = tmp_path / "webhook-tls"
        cert_dir.mkdir()
        cert, key = cluster.issue_cert(service_host, stem="tls", out_dir=cert_dir, dns=(service_host,),
                                       ips=("127.0.0.1",), server=True)
        env = kubeconfig_for(cluster, namespace, "operator", tmp_path / "operator.kubeconfig")
        port = free_port()
        log = tmp_path / "operator.log"
        cmd = [TOOLMESH, "operator", "--operator-namespace", namespace, "--webhook-host", "127.0.0.1",
               "--webhook-port", str(port), "--webhook-service", f"{RELEASE}-operator", "--webhook-cert-dir",
               str(cert_dir), "--sidecar-image", IMAGE]
        with running(cmd, env=env, log_path=log, stop_timeout=15) as operator:
            wait_until(lambda: operator.poll() is not None or port_open(port), timeout=60, what="the webhook port")
            assert operator.poll() is None, log.read_text(errors="replace")[-3000:]
            context = ssl.create_default_context(cafile=str(cluster.ca_cert))
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname=service_host) as tls:
                    served = tls.getpeercert()
            assert ("DNS", service_host) in served["subjectAltName"]
        config = get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
        assert all("caBundle" not in w["clientConfig"] for w in config["webhooks"]), "the CA is cert-manager's to inject"
        assert get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", namespace) is None
        text = log.read_text(errors="replace")
        assert "Forbidden" not in text and " 403" not in text, text[-3000:]
    finally:
        cluster.helm("uninstall", RELEASE, "-n", namespace, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "crd", "certificates.cert-manager.io", "issuers.cert-manager.io", "--wait=false",
                        check=False)


def test_an_operator_limited_to_namespaces_reconciles_there_with_roles_only(cluster, namespace, tmp_path):
    release = f"toolmesh-ns-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("delete", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "--ignore-not-found")
    cluster.helm("install", RELEASE, str(CHART), "-n", release, "--create-namespace",
                 "--set", f"operator.watchNamespaces[0]={namespace}", "--set", "webhook.enabled=false",
                 "--set", "sidecar.defaultPolicy.enabled=true", "--set", f"sidecar.defaultPolicy.namespaces[0]={namespace}",
                 timeout=180)
    try:
        operator_sa = service_account(release, "operator")
        assert can_i(cluster, operator_sa, "patch", "deployments.apps", "-n", namespace)
        assert not can_i(cluster, operator_sa, "patch", "deployments.apps", "-n", "default")
        assert not can_i(cluster, operator_sa, "list", "mcpservers", "-A")
        assert get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION) is None
        env = kubeconfig_for(cluster, release, "operator", tmp_path / "operator.kubeconfig")
        log = tmp_path / "operator.log"
        cmd = [TOOLMESH, "operator", "--operator-namespace", release, "--namespace", namespace, "--no-webhook",
               "--sidecar-image", IMAGE, "--registry-url", ""]
        server = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": "echo"},
                  "spec": {"image": "example.org/echo-mcp:1", "transport": "streamable-http", "port": 8080}}
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(server))
        with running(cmd, env=env, log_path=log, stop_timeout=15) as operator:
            def reconciled():
                assert operator.poll() is None, log.read_text(errors="replace")[-3000:]
                body = get_json(cluster, "mcpserver", "echo", "-n", namespace)
                applied = condition(body, "PolicyApplied")
                return applied and applied["status"] == "True" and body

            try:
                body = cluster.wait_for(reconciled, timeout=90, what="MCPServer echo reconciled by a namespaced operator")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{log.read_text(errors='replace')[-3000:]}") from None
        # The chart's default policy is what the operator merged in.
        assert body["status"]["appliedPolicies"] == ["toolmesh-default"]
        assert get_json(cluster, "deployment", "echo", "-n", namespace) is not None
        text = log.read_text(errors="replace")
        assert "Forbidden" not in text and " 403" not in text, text[-3000:]
    finally:
        cluster.helm("uninstall", RELEASE, "-n", release, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "namespace", release, "--wait=false", check=False)
