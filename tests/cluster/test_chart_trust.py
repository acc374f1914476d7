"""What a platform team relies on around the chart: a local operator beside a Helm install, one admission call per
pod, nothing left behind that breaks `helm install`, and an operator that stays out of namespaces not its own.

Operators run out of cluster as subprocesses (containers never run here). Where the chart is installed they run
with a token of the chart's own ServiceAccount, never admin.
"""

from __future__ import annotations

import json
import uuid

import pytest

from helpers import free_port, running
from helpers.chart import CHART
from helpers.operator_proc import (
    WEBHOOK_CONFIGURATION,
    can_i,
    condition,
    get_json,
    install_crds,
    kubeconfig_for,
    operator_cmd,
    stop,
    wait_listening,
)

pytestmark = pytest.mark.cluster

RELEASE = "trust"
FULLNAME = f"{RELEASE}-toolmesh"
WEBHOOKS = ("pods.inject.toolmesh.io", "namespaces.inject.toolmesh.io")


# --- helpers ----------------------------------------------------------------------------------------------------------











def helm_install(cluster, namespace: str, *values: str) -> None:
    # The webhook configuration has one fixed name: an earlier test's may still exist.
    cluster.kubectl("delete", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "--ignore-not-found")
    cluster.helm("install", RELEASE, str(CHART), "-n", namespace, "--create-namespace", "--wait=false",
                 *values, timeout=180)


def helm_uninstall(cluster, namespace: str) -> None:
    cluster.helm("uninstall", RELEASE, "-n", namespace, "--ignore-not-found", check=False)
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def labelled_pod(name: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": name, "labels": {"toolmesh.io/inject": "true"}},
                       "spec": {"containers": [{"name": "server", "image": "example.org/mcp:1"}]}})


def sidecars(pod: dict) -> list[dict]:
    return [c for c in pod["spec"].get("initContainers") or [] if c["name"] == "toolmesh-sidecar"]


def admission_calls(cluster, webhook: str) -> float:
    """Calls the API server made to `webhook`, from its own metrics (every code, every outcome)."""
    metrics = cluster.kubectl("get", "--raw", "/metrics").stdout
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("apiserver_admission_webhook_request_total{") and f'name="{webhook}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def mcpserver(name: str) -> str:
    return json.dumps({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": name},
                       "spec": {"image": "example.org/echo-mcp:1", "transport": "streamable-http", "port": 8080}})


def reconciled(cluster, namespace: str, name: str):
    body = get_json(cluster, "mcpserver", name, "-n", namespace)
    return body if condition(body, "PolicyApplied") else None


# --- a local operator beside a Helm install ---------------------------------------------------------------------------

def test_a_local_operator_takes_over_the_charts_webhook_and_gives_it_back(cluster, namespace, tmp_path):
    """`operator.replicas: 0` plus `toolmesh operator` on a laptop: it starts, serves the chart's webhook with the
    chart's timeoutSeconds kept, and on stopping leaves the configuration and Secret as the chart made them."""
    release = f"trust-local-{uuid.uuid4().hex[:6]}"
    helm_install(cluster, release, "--set", "operator.replicas=0", "--set", "webhook.timeoutSeconds=7")
    try:
        chart_config = get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
        chart_secret = get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", release)
        env = kubeconfig_for(cluster, release, f"{FULLNAME}-operator", tmp_path / "operator.kubeconfig")
        port, log = free_port(), tmp_path / "operator.log"
        with running(operator_cmd(release, port), env=env, log_path=log, stop_timeout=30) as operator:
            wait_listening(operator, port, log)
            config = get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
            secret = get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", release)
            for hook in config["webhooks"]:
                assert hook["clientConfig"] == {"url": f"https://127.0.0.1:{port}/inject-pods",
                                                "caBundle": secret["data"]["ca.crt"]}, hook["name"]
                assert hook["timeoutSeconds"] == 7, "the chart's timeoutSeconds stays"
            # The chart still owns both objects: `helm upgrade` and `helm uninstall` keep working.
            assert config["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
            assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
            # The API server reaches it: a labelled pod gets its sidecar.
            pod = json.loads(cluster.kubectl("create", "-n", namespace, "-f", "-", "-o", "json",
                                             input=labelled_pod("local")).stdout)
            assert len(sidecars(pod)) == 1
            text = stop(operator, log)
        assert operator.returncode == 0, text[-3000:]
        assert "exactly one of url or service" not in text
        config = get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
        assert [h["clientConfig"] for h in config["webhooks"]] == [h["clientConfig"] for h in chart_config["webhooks"]]
        assert [h["timeoutSeconds"] for h in config["webhooks"]] == [7, 7]
        assert get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", release)["data"] == chart_secret["data"]
    finally:
        helm_uninstall(cluster, release)


def test_a_refused_webhook_configuration_leaves_the_secret_alone(cluster, tmp_path):
    """The configuration change is tried before the Secret is written: when the API refuses it, the operator exits 2
    with the reason and the chart's Secret is untouched."""
    release = f"trust-refused-{uuid.uuid4().hex[:6]}"
    helm_install(cluster, release, "--set", "operator.replicas=0")
    try:
        before = get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", release)
        env = kubeconfig_for(cluster, release, f"{FULLNAME}-operator", tmp_path / "operator.kubeconfig")
        # A URL the API server refuses for a webhook (plain http), so the dry run fails.
        port, log = free_port(), tmp_path / "operator.log"
        cmd = operator_cmd(release, port)
        cmd[cmd.index("--webhook-host") + 1] = "127.0.0.1:1/#fragment"
        with running(cmd, env=env, log_path=log, stop_timeout=30) as operator:
            operator.wait(timeout=60)
        text = log.read_text(errors="replace")
        assert operator.returncode == 2, text[-3000:]
        assert "cannot set up the admission webhook" in text
        assert get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", release)["data"] == before["data"]
    finally:
        helm_uninstall(cluster, release)


# --- admission cost ---------------------------------------------------------------------------------------------------

def test_one_labelled_pod_costs_one_admission_call(cluster, namespace, tmp_path):
    install_crds(cluster)
    operator_ns = f"trust-calls-{uuid.uuid4().hex[:6]}"
    port, log = free_port(), tmp_path / "operator.log"
    cluster.kubectl("delete", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "--ignore-not-found")
    with running(operator_cmd(operator_ns, port), env=cluster.env, log_path=log, stop_timeout=30) as operator:
        wait_listening(operator, port, log)
        before = admission_calls(cluster, "pods.inject.toolmesh.io")
        pod = json.loads(cluster.kubectl("create", "-n", namespace, "-f", "-", "-o", "json",
                                         input=labelled_pod("counted")).stdout)
        assert len(sidecars(pod)) == 1
        # The ServiceAccount plugin did mutate the pod after the webhook (its token volume is there), which is
        # what made IfNeeded call the webhook a second time.
        assert any(v["name"].startswith("kube-api-access-") for v in pod["spec"]["volumes"])
        calls = admission_calls(cluster, "pods.inject.toolmesh.io") - before
        stop(operator, log)
    cluster.kubectl("delete", "namespace", operator_ns, "--wait=false", check=False)
    assert calls == 1


# --- nothing left behind ----------------------------------------------------------------------------------------------

def test_an_operator_run_with_defaults_leaves_nothing_that_breaks_helm_install(cluster, tmp_path):
    """Try the operator first, then install the chart into the namespace it used: the install succeeds, prints no
    warning, and the chart's webhook configuration and Secret are the chart's."""
    install_crds(cluster)
    release = f"trust-after-{uuid.uuid4().hex[:6]}"
    port, log = free_port(), tmp_path / "operator.log"
    cluster.kubectl("delete", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "--ignore-not-found")
    try:
        with running(operator_cmd(release, port), env=cluster.env, log_path=log, stop_timeout=30) as operator:
            wait_listening(operator, port, log)
            assert get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", release) is not None
            assert get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION) is not None
            text = stop(operator, log)
        assert operator.returncode == 0, text[-3000:]
        assert get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION) is None, \
            "a stopped local operator's webhook would refuse every labelled pod"
        installed = cluster.helm("install", RELEASE, str(CHART), "-n", release, "--wait=false", check=False,
                                 timeout=180)
        assert installed.returncode == 0, installed.stderr
        assert "warning" not in installed.stderr.lower(), installed.stderr
        secret = get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", release)
        assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    finally:
        helm_uninstall(cluster, release)


def test_helm_install_prints_no_warning(cluster):
    release = f"trust-quiet-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("delete", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "--ignore-not-found")
    try:
        installed = cluster.helm("install", RELEASE, str(CHART), "-n", release, "--create-namespace",
                                 "--wait=false", timeout=180)
        assert "warning" not in installed.stderr.lower(), installed.stderr
        assert get_json(cluster, "secret", "toolmesh-webhook-tls", "-n", release)["type"] == "Opaque"
    finally:
        helm_uninstall(cluster, release)


# --- namespaces the operator serves ------------------------------------------------------------------------------------

def test_a_cluster_wide_operator_leaves_system_namespaces_alone(cluster, namespace, tmp_path):
    install_crds(cluster)
    operator_ns = f"trust-wide-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", operator_ns)
    name = f"sys-{uuid.uuid4().hex[:6]}"
    system = ("kube-system", "kube-public", operator_ns)
    for ns in system:
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=mcpserver(name))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=mcpserver(name))
    log = tmp_path / "operator.log"
    try:
        with running(operator_cmd(operator_ns, free_port(), "--no-webhook"), env=cluster.env, log_path=log,
                     stop_timeout=30) as operator:
            try:
                cluster.wait_for(lambda: reconciled(cluster, namespace, name), timeout=60,
                                 what="the MCPServer in an ordinary namespace reconciled")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{log.read_text(errors='replace')[-3000:]}") from None
            # Changing the ordinary one after the system ones were created: once that change is reconciled,
            # an operator serving the system namespaces would have reconciled them too.
            cluster.kubectl("label", "mcpserver", name, "-n", namespace, "touched=yes")
            cluster.wait_for(lambda: get_json(cluster, "deployment", name, "-n", namespace), timeout=30,
                             what="the Deployment in the ordinary namespace")
            stop(operator, log)
        for ns in system:
            body = get_json(cluster, "mcpserver", name, "-n", ns)
            assert not body.get("status"), f"the MCPServer in {ns} was reconciled"
            assert get_json(cluster, "deployment", name, "-n", ns) is None, ns
    finally:
        for ns in system:
            cluster.kubectl("delete", "mcpserver", name, "-n", ns, "--wait=false", check=False)
            cluster.kubectl("patch", "mcpserver", name, "-n", ns, "--type=merge", "-p",
                            '{"metadata":{"finalizers":null}}', check=False)
        cluster.kubectl("delete", "namespace", operator_ns, "--wait=false", check=False)


def test_label_mode_serves_only_labelled_namespaces_with_rights_there_only(cluster, tmp_path):
    """`operator.namespaceSelector`: RBAC only in labelled namespaces, reconciles and injects only there, and
    follows a namespace labelled later (with the RoleBinding the docs say to create)."""
    install_crds(cluster)
    suffix = uuid.uuid4().hex[:6]
    release, served, unserved, later = (f"trust-{k}-{suffix}" for k in ("sel", "served", "unserved", "later"))
    label = f"trust-{suffix}/serve"
    for ns in (served, unserved, later):
        cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("label", "namespace", served, f"{label}=yes")
    helm_install(cluster, release, "--set", "operator.replicas=0", "--set-json",
                 f'operator.namespaceSelector={{"{label}": "yes"}}')
    try:
        sa = f"system:serviceaccount:{release}:{FULLNAME}-operator"
        assert can_i(cluster, sa, "patch", "deployments.apps", "-n", served)
        assert can_i(cluster, sa, "get", "secrets", "-n", served)
        for ns in (unserved, later, "kube-system", "default"):
            assert not can_i(cluster, sa, "patch", "deployments.apps", "-n", ns), ns
            assert not can_i(cluster, sa, "get", "secrets", "-n", ns), ns
        assert not can_i(cluster, sa, "list", "mcpservers", "-A")
        config = get_json(cluster, "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
        for hook in config["webhooks"]:
            assert {"key": label, "operator": "In", "values": ["yes"]} in hook["namespaceSelector"]["matchExpressions"]

        for ns in (served, unserved, later):
            cluster.kubectl("apply", "-n", ns, "-f", "-", input=mcpserver("echo"))
        env = kubeconfig_for(cluster, release, f"{FULLNAME}-operator", tmp_path / "operator.kubeconfig")
        deployment = get_json(cluster, "deployment", f"{FULLNAME}-operator", "-n", release)
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        [selector_arg] = [a for a in args if a.startswith("--namespace-selector=")]
        port, log = free_port(), tmp_path / "operator.log"
        with running(operator_cmd(release, port, selector_arg), env=env, log_path=log, stop_timeout=30) as operator:
            wait_listening(operator, port, log)

            def wait_for(predicate, what: str):
                try:
                    return cluster.wait_for(predicate, timeout=60, what=what)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n{log.read_text(errors='replace')[-3000:]}") from None

            wait_for(lambda: reconciled(cluster, served, "echo"), "the labelled namespace's MCPServer")
            served_pod = json.loads(cluster.kubectl("create", "-n", served, "-f", "-", "-o", "json",
                                                    input=labelled_pod("p")).stdout)
            unserved_pod = json.loads(cluster.kubectl("create", "-n", unserved, "-f", "-", "-o", "json",
                                                      input=labelled_pod("p")).stdout)
            assert len(sidecars(served_pod)) == 1 and not sidecars(unserved_pod)

            # A namespace labelled while the operator runs, bound as the values' comment says.
            cluster.kubectl("create", "rolebinding", f"{FULLNAME}-operator", "-n", later,
                            f"--clusterrole={FULLNAME}-operator-reconcile",
                            f"--serviceaccount={release}:{FULLNAME}-operator")
            cluster.kubectl("label", "namespace", later, f"{label}=yes")
            wait_for(lambda: reconciled(cluster, later, "echo"), "a namespace labelled later to be served")
            stop(operator, log)
        assert not (get_json(cluster, "mcpserver", "echo", "-n", unserved).get("status"))
        assert get_json(cluster, "deployment", "echo", "-n", unserved) is None
        text = log.read_text(errors="replace")
        assert "Forbidden" not in text and " 403" not in text, text[-3000:]
    finally:
        helm_uninstall(cluster, release)
        for ns in (served, unserved, later):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
