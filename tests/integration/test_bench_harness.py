"""The benchmark harness still runs end to end: wrk drives 1, 16 and 64 connections through the sidecar and every answer is right."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.timeout(300)


def test_quick_benchmark_of_the_sidecar(tmp_path):
    assert shutil.which("wrk"), "wrk is missing: run `make system-deps`"
    out = tmp_path / "sidecar.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "harness.py"), "--quick", "--seconds", "1", "sidecar",
                           "--out", str(out)], env=dict(os.environ), cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["targets"]
    for name in ("direct", "sidecar"):
        for load in ("c1", "c16", "c64"):
            figures = results[name][load]
            assert figures["rps"] > 0, f"{name} {load}: {figures}"
            assert figures["failed"] == 0, f"{name} {load}: {figures}"
    # The sidecar passed every call on (no cache without a policy) and said when it was ready.
    assert results["sidecar"]["c16"]["upstream_calls_per_call"] >= 0.99
    assert results["sidecar"]["ready_s"] > 0
