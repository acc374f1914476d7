"""The official MCP conformance suite against a legacy HTTP+SSE server behind `toolmesh sidecar`: nothing lost."""

from __future__ import annotations

import sys

import pytest

from helpers import free_port, port_open, running, wait_until
from helpers.conformance import run_suite, suite_installed
from helpers.sidecar import sidecar
from helpers.transport_conformance import FIXTURE_OVER_SSE, eras_missing, lost

pytestmark = [pytest.mark.conformance, pytest.mark.node, pytest.mark.timeout(900)]


def test_the_conformance_suite_passes_through_the_legacy_sse_adapter(tmp_path):
    assert suite_installed(), "the conformance suite is missing: run `make node-deps`"
    port = free_port()
    with running([sys.executable, str(FIXTURE_OVER_SSE), str(port)], log_path=tmp_path / "fixture.log"):
        wait_until(lambda: port_open(port), timeout=30, what="the fixture to listen")
        upstream = ["--upstream", f"http://127.0.0.1:{port}/sse", "--upstream-transport", "sse"]
        with sidecar(upstream, tmp_path, "--log-level", "WARNING") as sc:
            run = run_suite(sc.url)
    assert run.checks, f"the suite reported no checks:\n{run.output[-3000:]}"
    assert lost(run) == {}
    assert eras_missing(run) == []
