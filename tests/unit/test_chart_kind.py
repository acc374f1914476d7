"""tests/kind/run.sh, the laptop-cluster path: shellcheck-clean, and what it asks of the chart and examples exists."""

from __future__ import annotations

import re
import shutil
import subprocess

from helpers import ROOT
from helpers.chart import find, objects, template

SCRIPT = ROOT / "tests" / "kind" / "run.sh"


def test_shellcheck_finds_nothing():
    assert shutil.which("shellcheck"), "shellcheck is a system package: run `make system-deps`"
    result = subprocess.run(["shellcheck", "--severity=style", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_script_is_executable_and_strict():
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert SCRIPT.stat().st_mode & 0o111


def test_the_values_it_sets_render_and_the_service_it_forwards_exists():
    text = SCRIPT.read_text()
    settings = re.findall(r"--set (image\.\w+)=", text)
    assert sorted(settings) == ["image.pullPolicy", "image.repository", "image.tag"]
    namespace = re.search(r"NAMESPACE=\$\{NAMESPACE:-([\w-]+)\}", text).group(1)
    docs = objects(template("--set", "image.repository=ghcr.io/toolmesh/toolmesh", "--set", "image.tag=0.1.0",
                            namespace=namespace).stdout)
    forwarded = re.search(r"port-forward svc/([\w-]+)", text).group(1)
    [service] = find(docs, "Service", forwarded)
    assert service["spec"]["ports"][0]["port"] == 7401
    applied = re.findall(r'-f "\$ROOT/([^"]+)"', text)
    assert applied and all((ROOT / path).is_file() for path in applied), applied
    # The server it waits for runs in the toolmesh image: a command, no image of its own.
    import yaml

    time_server = yaml.safe_load((ROOT / "examples" / "quickstart" / "time.yaml").read_text())
    assert "mcpserver time" in text and "image" not in time_server["spec"]
    assert re.search(r"mcp-server-time==", (ROOT / "Dockerfile").read_text()), "the image carries the time server"
