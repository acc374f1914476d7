"""tests/kind/run.sh, the laptop-cluster path, and tests/pods/'s scripts, the real-node tier CI runs: shellcheck-clean,
and what run.sh asks of the chart and examples exists."""

from __future__ import annotations

import re
import shutil
import subprocess

from helpers import ROOT
from helpers.chart import find, objects, template

SCRIPT = ROOT / "tests" / "kind" / "run.sh"
SCRIPTS = [SCRIPT, *sorted((ROOT / "tests" / "pods").glob("*.sh"))]


def test_shellcheck_finds_nothing():
    assert shutil.which("shellcheck"), "shellcheck is a system package: run `make system-deps`"
    assert len(SCRIPTS) >= 6, SCRIPTS
    result = subprocess.run(["shellcheck", "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_executable_and_strict():
    for script in SCRIPTS:
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        assert "set -euo pipefail" in text, script
        assert script.stat().st_mode & 0o111, script


def test_run_sh_waits_for_the_tool_before_calling_it():
    text = SCRIPT.read_text()
    listing = text.index("grep -q time__get_current_time")
    assert listing < text.index('call "http://127.0.0.1:$PORT/mcp" time__get_current_time')


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
