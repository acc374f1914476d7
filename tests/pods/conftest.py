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
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.pods import IMAGES, RealNode, require_root, run_script, start_real_node

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
    """A short folder for the tier's state (unix socket paths are bounded), removed at the end."""
    require_root()
    state = Path(tempfile.mkdtemp(prefix="tm-pods-"))
    try:
        yield state
    finally:
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def images(pods_state: Path) -> Iterator[dict]:
    """dockerd (started if none answers, stopped again), then the tier's images; their sizes and build seconds."""
    from helpers.pods import pods_bin_dir

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
