"""Namespaces that come and go while the operator starts never stall reconciling in the others.

kopf holds every handler until the indexes of every namespace it watches are listed; a namespace deleted while
its first listing is under way used to leave that hold in place for good, and from then on no server in a new
namespace was reconciled (seen when an operator started beside namespaces a test run was deleting). The
operator serving every namespace now watches cluster-wide, one watch per kind."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from helpers.operator_proc import condition, get_json, install_crds, operator_running

pytestmark = pytest.mark.cluster

DOOMED = 40
ROUNDS = 6


def server(name: str) -> str:
    return yaml.safe_dump({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": name},
                           "spec": {"image": "example.org/mcp:1"}})


def for_each(cluster, names: list[str], *args: str) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: cluster.kubectl(*args, name, check=False), names))


def test_servers_reconcile_when_namespaces_vanish_as_the_operator_starts(cluster, namespace, tmp_path):
    install_crds(cluster)
    for round_ in range(ROUNDS):
        doomed = [f"doomed-{uuid.uuid4().hex[:8]}" for _ in range(DOOMED)]
        for_each(cluster, doomed, "create", "namespace")
        with operator_running(cluster, tmp_path / f"operator-{round_}.log", webhook=False) as op:
            # Deleted while the operator lists what is in each of them.
            for_each(cluster, doomed, "delete", "namespace", "--wait=false")
            fresh = f"fresh-{uuid.uuid4().hex[:6]}"
            cluster.kubectl("create", "namespace", fresh)
            try:
                for ns in (namespace, fresh):
                    cluster.kubectl("apply", "-n", ns, "-f", "-", input=server(f"s{round_}"))
                    cluster.wait_for(lambda: condition(get_json(cluster, "mcpserver", f"s{round_}", "-n", ns),
                                                       "Ready"), timeout=20,
                                     what=f"MCPServer {ns}/s{round_} reconciled (round {round_ + 1})")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{op.log()[-2000:]}") from None
            finally:
                cluster.kubectl("delete", "namespace", fresh, "--wait=false", check=False)
