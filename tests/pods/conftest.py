"""Fixtures of the real-node tier: the images built from the Dockerfile and a one-node cluster whose pods run.

    def test_something(real_node):
        real_node.kubectl("apply", "-f", "-", input=manifest)   # pods really start, from toolmesh:dev

Every test here is marked `pods`. The tier needs root, a docker engine (started if none answers), the
control plane (`make cluster-bins`) and the node binaries (the same target); a machine without them fails
the tests with the reason, it never skips them. The first test carries the set-up's time: the images
(about a minute warm, a few cold) and the node (about 20 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.pods import IMAGES, RealNode, pods_bin_dir, require_root, run_script, start_real_node

HERE = Path(__file__).resolve().parent
SETUP_TIMEOUT = 1800  # seconds: a cold machine builds the base image and the project image first


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = True
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.pods)
            if first:  # the session fixtures are set up inside the first test's time limit
                item.add_marker(pytest.mark.timeout(SETUP_TIMEOUT))
                first = False


@pytest.fixture(scope="session")
def pods_state() -> Iterator[Path]:
    """A short folder for the tier's state (unix socket paths are bounded), removed at the end.

    The host's network and kernel state is read before anything starts and again after everything stopped
    (node and docker engine): any difference fails the session's teardown, naming what was left behind.
    """
    require_root()
    before = host_state()
    state = Path(tempfile.mkdtemp(prefix="tm-pods-"))
    try:
        yield state
    finally:
        shutil.rmtree(state, ignore_errors=True)
    after = host_state()
    left = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    assert not left, f"the real-node tier left the host changed: {json.dumps(left, indent=1)[:4000]}"


def host_state() -> dict[str, list[str]]:
    """What the node and the engine touch on the host: rules, tables, links, routes, sysctls, mounts, folders."""
    def lines(*cmd: str) -> list[str]:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
        return sorted(re.sub(r"\[\d+:\d+\]", "[]", line) for line in out.splitlines() if not line.startswith("#"))

    sysctls = ("vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
               "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes", "net.ipv4.ip_forward",
               "net.bridge.bridge-nf-call-iptables")
    return {
        "iptables": lines("iptables-save"),
        "ip6tables": lines("ip6tables-save"),
        "nft tables": lines("nft", "list", "tables"),
        "links": sorted(line.split(":")[1].strip().split("@")[0] for line in lines("ip", "-o", "link")),
        "routes": lines("ip", "route"),
        "netns": lines("ip", "netns", "list"),
        "sysctls": lines("sysctl", *sysctls),
        "mounts": sorted(line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()),
        "folders": [d for d in ("/var/lib/kubelet", "/var/log/pods", "/var/log/containers", "/run/netns",
                                "/sys/fs/cgroup/cpu/kubepods", "/sys/fs/cgroup/memory/kubepods") if Path(d).exists()],
    }


@pytest.fixture(scope="session")
def images(pods_state: Path) -> Iterator[dict]:
    """dockerd (started if none answers, stopped again), then the tier's images; their sizes and build seconds."""
    env = dict(os.environ, TOOLMESH_PODS_STATE=str(pods_state), PODS_BIN=str(pods_bin_dir()))
    run_script("dockerd.sh", "start", env=env, timeout=60)
    try:
        run_script("images.sh", env=env, timeout=SETUP_TIMEOUT - 120)
        yield json.loads((pods_state / "images.json").read_text())
    finally:
        run_script("dockerd.sh", "stop", env=env, timeout=60)


@pytest.fixture(scope="session")
def real_node(images: dict, pods_state: Path) -> Iterator[RealNode]:
    """The one-node cluster with the tier's images in its containerd; taken down at the end of the session."""
    node = start_real_node(pods_state)
    try:
        node.load(*IMAGES)
        yield node
    finally:
        node.stop()
