"""The gateway as agents meet it: a call's failure stays the call's, auth spoken at the gateway's own door, bare
names that respect the caller, the registry's /metrics, and `registry --kube` without a cluster."""

from __future__ import annotations

from helpers import toolmesh_cli


def test_registry_kube_without_a_cluster_exits_2_with_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    done = toolmesh_cli("registry", "--kube", "--listen", "127.0.0.1:0", timeout=60,
                        env={"HOME": str(home), "KUBECONFIG": str(tmp_path / "no-kubeconfig")})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("toolmesh registry: --kube: cannot reach Kubernetes"), done.stderr
    assert "Traceback" not in done.stderr
