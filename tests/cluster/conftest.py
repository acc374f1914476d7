"""Fixtures for tests against a real Kubernetes control plane: `cluster` (one per session) and `namespace` (one per test).

    def test_something(cluster, namespace):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
        pods = cluster.kubectl_json("get", "pods", "-n", namespace)

`cluster` is a `helpers.kube.ControlPlane`; see its docstring for everything it offers
(kubeconfig, server, ca_cert/ca_key, kubectl, helm, api_client, token_for, env). Every test
under tests/cluster/ is marked `cluster`. Missing binaries fail the test: run `make cluster-bins`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.kube import ControlPlane, start_control_plane

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, controller-manager, scheduler and kwok on loopback, with one fake Node; stopped at session end."""
    plane = start_control_plane(tmp_path_factory.mktemp("cluster"))
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def namespace(cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its `default` ServiceAccount ready) for one test; deleted afterwards without waiting."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].rstrip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    cluster.wait_for(lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
                     timeout=30, what=f"the default ServiceAccount in {name}")
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
