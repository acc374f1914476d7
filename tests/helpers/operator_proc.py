"""Runs `toolmesh operator` against the test control plane as a real subprocess, and installs the CRDs it needs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import ROOT, TOOLMESH, free_port, port_open, running, wait_until

SIDECAR_IMAGE = "ghcr.io/toolmesh/toolmesh:test"
WEBHOOK_CONFIGURATION = "toolmesh-sidecar-injector"


@dataclass
class OperatorProcess:
    """A running operator: its webhook port, its namespace and its log."""

    webhook_port: int
    namespace: str
    log_path: Path
    proc: object

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def install_crds(cluster) -> None:
    """Apply crds/ (server-side: the schemas are large) and wait until both are served."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    for name in ("mcpservers.toolmesh.io", "mcptoolpolicies.toolmesh.io"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")


@contextmanager
def operator_running(cluster, log_path: Path, *, namespace: str = "toolmesh-system", webhook: bool = True,
                     extra: tuple[str, ...] = ()) -> Iterator[OperatorProcess]:
    """The operator, watching all namespaces, webhook on a free loopback port; stopped (and its webhook
    configuration removed, so later pods are not refused) when the block ends."""
    port = free_port()
    cmd = [TOOLMESH, "operator", "--operator-namespace", namespace, "--webhook-host", "127.0.0.1",
           "--webhook-port", str(port), "--sidecar-image", SIDECAR_IMAGE, "--registry-url", "", *extra]
    if not webhook:
        cmd.append("--no-webhook")
    with running(cmd, env=cluster.env, log_path=log_path, stop_timeout=15) as proc:
        op = OperatorProcess(webhook_port=port, namespace=namespace, log_path=log_path, proc=proc)
        try:
            if webhook:
                wait_until(lambda: proc.poll() is not None or port_open(port), timeout=60,
                           what="the operator's webhook to listen")
            assert proc.poll() is None, f"the operator exited:\n{op.log()}"
        except AssertionError as exc:
            raise AssertionError(f"{exc}\noperator log:\n{op.log()[-4000:]}") from None
        yield op
    if webhook:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "--ignore-not-found",
                        check=False)
        # A killed operator leaves its policy validator behind too; a later test's helm install would trip on it.
        cluster.kubectl("delete", "validatingwebhookconfiguration", "toolmesh-policy-validator", "--ignore-not-found",
                        check=False)


def create_servers(cluster, namespace: str, bodies: list[dict], workers: int = 8) -> None:
    """Create many MCPServers at once through the API (kubectl applies one object at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    from kubernetes import client

    with cluster.api_client() as api:
        api.configuration.connection_pool_maxsize = workers
        custom = client.CustomObjectsApi(api)

        def create(body: dict) -> None:
            custom.create_namespaced_custom_object("toolmesh.io", "v1alpha1", namespace, "mcpservers", body)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(create, bodies))


def get_json(cluster, *args) -> dict | None:
    """`kubectl get ... -o json`, or None when it does not exist (yet)."""
    proc = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def condition(obj: dict | None, type_: str) -> dict | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


# --- an operator run by hand beside a Helm install, as a platform team's engineer would ---------------------------

def kubeconfig_for(cluster, namespace: str, service_account: str, path: Path) -> dict[str, str]:
    """Environment whose KUBECONFIG authenticates as `service_account` of `namespace`, not as admin."""
    token = cluster.kubectl("create", "token", service_account, "-n", namespace, "--duration", "1h").stdout.strip()
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "test", "cluster": {"server": cluster.server, "certificate-authority": str(cluster.ca_cert)}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": "sa", "namespace": namespace}}],
    }
    path.write_text(json.dumps(config))
    return dict(cluster.env, KUBECONFIG=str(path))


def operator_cmd(operator_namespace: str, port: int, *extra: str) -> list[str]:
    """`toolmesh operator` serving its webhook on 127.0.0.1:`port` (a local operator)."""
    return [TOOLMESH, "operator", "--operator-namespace", operator_namespace, "--webhook-host", "127.0.0.1",
            "--webhook-port", str(port), "--sidecar-image", SIDECAR_IMAGE, "--registry-url", "", *extra]


def wait_listening(proc, port: int, log: Path) -> None:
    wait_until(lambda: proc.poll() is not None or port_open(port), timeout=60, what="the operator's webhook")
    assert proc.poll() is None, f"the operator exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"


def stop(proc, log: Path) -> str:
    """SIGTERM, as Ctrl-C or a pod deletion would; returns the operator's log."""
    proc.terminate()
    proc.wait(timeout=30)
    return log.read_text(errors="replace")


def can_i(cluster, who: str, *args: str) -> bool:
    return cluster.kubectl("auth", "can-i", *args, f"--as={who}", check=False).stdout.strip() == "yes"
