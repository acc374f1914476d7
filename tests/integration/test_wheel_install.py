"""The image's virtualenv, built by replaying the Dockerfile's build stage here: every entry point starts and the sidecar serves a real tool call.

The build stage runs with its paths (/src, /dist, /opt/toolmesh) mapped into a temporary
directory and pip pointed at a local wheelhouse (PIP_NO_INDEX, PIP_FIND_LINKS), filled once from
PyPI with the pinned versions and cached under $TOOLMESH_CACHE; the pip flags, packages and
steps are the Dockerfile's own. The runtime stage's ENV is applied to every command.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from helpers import ROOT, free_port, port_open, running, wait_until
from helpers.dockerfile import env_of, parse, replay

CACHE = Path(os.environ.get("TOOLMESH_CACHE") or Path.home() / ".cache" / "toolmesh")
CONTAINER_PATHS = ("/src", "/dist", "/opt/toolmesh")


def _requirements() -> list[str]:
    """What the build stage's pip resolves: the build backend, toolmesh's dependencies and the extra stdio server."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra = re.findall(r"\b(mcp-server-time==\S+)", (ROOT / "Dockerfile").read_text())
    return [*project["build-system"]["requires"], *project["project"]["dependencies"], *extra]


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    """Wheels of every pinned dependency, downloaded once per set of pins (pip download), then used offline."""
    requirements = _requirements()
    key = hashlib.sha256("\n".join([*requirements, (ROOT / "constraints.txt").read_text()]).encode()).hexdigest()[:12]
    house = CACHE / f"wheelhouse-{key}"
    done = house / ".complete"
    if not done.exists():
        house.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--constraint",
                        str(ROOT / "constraints.txt"), "--dest", str(house), *requirements],
                       check=True, timeout=600, env=dict(os.environ, PIP_FIND_LINKS=""))
        done.touch()
    return house


@pytest.fixture(scope="module")
def image_env(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Replay the build stage; return the runtime environment (the final stage's ENV) with paths mapped."""
    root = tmp_path_factory.mktemp("image")
    paths = {p: root / p.strip("/").replace("/", "_") for p in CONTAINER_PATHS}
    _, stages = parse()
    build, runtime = stages[0], stages[-1]
    # Nothing of the test run's own Python settings: the stage's ENV and a plain environment only.
    build_env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
    build_env.update(env_of(build))
    # `python` is a Python 3.11 like the base image's; pip reads only the local wheelhouse.
    build_env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PIP_NO_INDEX="1",
                     PIP_FIND_LINKS=str(wheelhouse), PIP_DISABLE_PIP_VERSION_CHECK="1")
    replay(build, paths, env=build_env, log=root / "build.log")

    venv = paths["/opt/toolmesh"]
    # The image's root filesystem is read-only in the chart: nothing under the virtualenv may need writing.
    for folder, _, files in os.walk(venv):
        for name in [*files, "."]:
            target = Path(folder, name)
            if not target.is_symlink():
                target.chmod(target.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON", "TIKTOKEN"))}
    for key, value in env_of(runtime).items():
        for container_path in sorted(paths, key=len, reverse=True):
            value = value.replace(container_path, str(paths[container_path]))
        env[key] = value.replace("$PATH", os.environ["PATH"])
    yield env
    for folder, dirs, _ in os.walk(venv):
        for name in [".", *dirs]:
            Path(folder, name).chmod(0o755)


def _run(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60, cwd=cwd)


def test_every_entry_point_answers_help_from_the_image_venv(image_env: dict[str, str], tmp_path: Path):
    toolmesh = _run(image_env, "which", "toolmesh").stdout.strip()
    assert toolmesh.endswith("opt_toolmesh/bin/toolmesh"), toolmesh
    for command in ([], ["operator"], ["sidecar"], ["registry"], ["up"], ["crds"], ["tools"], ["call"]):
        result = _run(image_env, "toolmesh", *command, "--help", cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
        assert "usage: toolmesh" in result.stdout
    crds = _run(image_env, "toolmesh", "crds", cwd=tmp_path)
    assert crds.returncode == 0 and "name: mcpservers.toolmesh.io" in crds.stdout


def test_the_runtime_has_no_installer(image_env: dict[str, str]):
    venv_bin = Path(_run(image_env, "which", "toolmesh").stdout.strip()).parent
    assert not any(p.name.startswith("pip") for p in venv_bin.iterdir())
    result = _run(image_env, "python", "-c", "import pip")
    assert result.returncode != 0


def test_tokenizer_loads_the_baked_vocabulary_from_a_read_only_folder(image_env: dict[str, str], tmp_path: Path):
    folder = Path(image_env["TIKTOKEN_CACHE_DIR"])
    assert len(list(folder.iterdir())) == 2, "both offline vocabularies are baked in"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    result = _run(image_env, "python", "-c",
                  "from toolmesh.sidecar.chain.stages.tokenizer import Tokenizer; print(Tokenizer().count('hello world'))", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_sidecar_from_the_image_venv_proxies_a_real_tool_call(image_env: dict[str, str], tmp_path: Path):
    port = free_port()
    log = tmp_path / "sidecar.log"
    with running(["toolmesh", "sidecar", "--upstream-command", "mcp-server-time --local-timezone UTC",
                  "--listen", f"127.0.0.1:{port}", "--server-name", "time"], env=image_env, cwd=tmp_path,
                 log_path=log):
        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                return response.status == 200

        wait_until(ready, timeout=30, what=f"the sidecar ready (log: {log})")
        tools = _run(image_env, "toolmesh", "tools", f"http://127.0.0.1:{port}/mcp", cwd=tmp_path)
        assert tools.returncode == 0, tools.stderr
        assert "get_current_time" in tools.stdout
        call = _run(image_env, "toolmesh", "call", f"http://127.0.0.1:{port}/mcp", "get_current_time",
                    "timezone=Europe/Paris", "--output", "json", cwd=tmp_path)
        assert call.returncode == 0, call.stderr
        assert "Europe/Paris" in call.stdout


def test_the_quickstart_time_pod_runs_from_the_image(image_env: dict[str, str], tmp_path: Path):
    """The operator's rendering of examples/quickstart/time.yaml (no image of its own: it runs in this one),
    server container and sidecar run as rendered, with the pod's emptyDirs as local folders."""
    import yaml

    from toolmesh.operator.inject import POLICY_DIR, SIDECAR_NAME, STDIO_DIR
    from toolmesh.operator.render import SERVER_CONTAINER, OperatorConfig, render_server

    body = yaml.safe_load((ROOT / "examples" / "quickstart" / "time.yaml").read_text())
    body["metadata"].update(namespace="default", uid="u-1", generation=1)
    rendered = render_server(body, [], OperatorConfig(registry_url=None))
    deployment = next(m for m in rendered.manifests if m["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == SERVER_CONTAINER)
    sidecar = next(c for c in pod["initContainers"] if c["name"] == SIDECAR_NAME)
    assert server["image"] == sidecar["image"] == OperatorConfig.sidecar_image
    fifo_dir, policy_dir = tmp_path / "stdio", tmp_path / "policy"
    fifo_dir.mkdir()
    policy_dir.mkdir()
    configmap = next(m for m in rendered.manifests if m["kind"] == "ConfigMap")
    for name, text in configmap["data"].items():
        (policy_dir / name).write_text(text)
    port = free_port()
    places = {STDIO_DIR: str(fifo_dir), POLICY_DIR: str(policy_dir), "0.0.0.0:7400": f"127.0.0.1:{port}"}

    def localise(values: list[str]) -> list[str]:
        out = []
        for value in values:
            for old, new in places.items():
                value = value.replace(old, new)
            out.append(value)
        return out

    server_env = dict(image_env, **{e["name"]: localise([e["value"]])[0] for e in server.get("env", [])})
    sidecar_env = dict(image_env, **{e["name"]: localise([e["value"]])[0] for e in sidecar.get("env", [])
                                     if "value" in e})
    log = tmp_path / "sidecar.log"
    with running(localise(server["command"] + server.get("args", [])), env=server_env, cwd=tmp_path,
                 log_path=tmp_path / "server.log"), \
            running(localise(sidecar["command"] + sidecar["args"]), env=sidecar_env, cwd=tmp_path,
                    log_path=log) as proc:
        wait_until(lambda: proc.poll() is not None or port_open(port), timeout=30, what="the sidecar to listen")
        assert proc.poll() is None, log.read_text(errors="replace")
        call = _run(image_env, "toolmesh", "call", f"http://127.0.0.1:{port}/mcp", "get_current_time",
                    "timezone=UTC", "--output", "json", cwd=tmp_path)
        assert call.returncode == 0, call.stderr + log.read_text(errors="replace")[-2000:]
        assert '"timezone": "UTC"' in call.stdout or '\\"timezone\\": \\"UTC\\"' in call.stdout, call.stdout
