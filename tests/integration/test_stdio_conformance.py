"""The official MCP conformance suite against a stdio server behind `toolmesh sidecar`: the bridge keeps every check."""

from __future__ import annotations

import shlex
import sys

import pytest

from helpers.conformance import run_suite, suite_installed
from helpers.sidecar import sidecar
from helpers.transport_conformance import FIXTURE, eras_missing, lost

pytestmark = [pytest.mark.conformance, pytest.mark.node, pytest.mark.timeout(900)]


def test_the_conformance_suite_passes_through_the_stdio_bridge(tmp_path):
    assert suite_installed(), "the conformance suite is missing: run `make node-deps`"
    command = shlex.join([sys.executable, str(FIXTURE), "--stdio"])
    with sidecar(["--upstream-command", command], tmp_path, "--log-level", "WARNING") as sc:
        run = run_suite(sc.url)
    assert run.checks, f"the suite reported no checks:\n{run.output[-3000:]}"
    assert lost(run) == {}
    assert eras_missing(run) == []
