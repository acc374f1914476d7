"""The image as built from the Dockerfile: read-only, non-root, tokenizer baked in, every component starting.

Containers here use the host's network (the tier's docker engine has no bridge) or none at all, and
listen on loopback ports picked free.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from helpers import ROOT, TOOLMESH, free_port, wait_until
from helpers.pods import IMAGE, RealNode, http_status

RUN = ["docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp"]


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@contextmanager
def container(*args: str) -> Iterator[str]:
    """`docker run -d` with the image's entry point (`toolmesh`); removed afterwards, its logs shown on failure."""
    started = docker("run", "-d", "--read-only", "--tmpfs", "/tmp", *args)
    assert started.returncode == 0, started.stderr
    cid = started.stdout.strip()
    try:
        yield cid
    except BaseException:
        print(docker("logs", "--tail", "60", cid).stdout, docker("logs", "--tail", "60", cid).stderr)
        raise
    finally:
        docker("rm", "-f", cid)


def test_the_image_is_small_enough_and_built_from_the_dockerfile(images: dict):
    assert images["toolmesh_image"] == IMAGE
    assert images["toolmesh_bytes"] <= 400_000_000, f"the image is {images['toolmesh_bytes'] / 1e6:.0f} MB"
    labels = json.loads(docker("image", "inspect", "-f", "{{ json .Config.Labels }}", IMAGE).stdout)
    assert labels["org.opencontainers.image.title"] == "toolmesh"
    config = json.loads(docker("image", "inspect", "-f", "{{ json .Config }}", IMAGE).stdout)
    assert config["User"] == "10001:10001" and config["Entrypoint"] == ["toolmesh"]


def test_the_image_runs_read_only_as_uid_and_gid_10001_without_pip(images: dict):
    script = (
        "import os, grp, pwd, importlib.util\n"
        "print(os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name)\n"
        "print(importlib.util.find_spec('pip') is None)\n"
        "try:\n    open('/opt/toolmesh/x', 'w')\nexcept OSError as exc:\n    print(type(exc).__name__, exc.errno)\n"
    )
    for user in ([], ["--user", "10001"]):  # as the image says, and as `runAsUser: 10001` without a group would
        result = subprocess.run([*RUN, "--network", "none", *user, "--entrypoint", "python", IMAGE, "-c", script],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        ids, no_pip, write = result.stdout.splitlines()
        assert ids == "10001 10001 toolmesh toolmesh", f"with {user or 'the image user'}: {ids}"
        assert no_pip == "True"
        assert write == "OSError 30"  # EROFS: the root filesystem is read-only


def test_the_tokenizer_counts_without_a_network(images: dict):
    script = (
        "from toolmesh.sidecar.chain.stages import tokenizer\n"
        "for name in tokenizer.ENCODINGS:\n"
        "    print(name, len(tokenizer.encoding(name).encode('the tokenizer data is baked into the image')))\n"
    )
    result = subprocess.run([*RUN, "--network", "none", "--entrypoint", "python", IMAGE, "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    counts = dict(line.split() for line in result.stdout.splitlines())
    assert counts and all(int(n) > 5 for n in counts.values()), counts


def test_the_sidecar_serves_a_stdio_server_from_the_read_only_image(images: dict):
    port = free_port()
    with container("--network", "host", IMAGE, "sidecar", "--listen", f"127.0.0.1:{port}",
                   "--upstream-command", "mcp-server-time"):
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, timeout=60, interval=0.2,
                   what="the sidecar's /readyz")
        call = subprocess.run([TOOLMESH, "call", f"http://127.0.0.1:{port}/mcp", "get_current_time", "timezone=UTC"],
                              capture_output=True, text=True, timeout=60)
    assert call.returncode == 0, call.stderr
    assert '"timezone": "UTC"' in call.stdout or "UTC" in call.stdout


def test_the_registry_starts_and_its_gateway_answers(images: dict):
    port = free_port()
    with container("--network", "host", IMAGE, "registry", "--listen", f"127.0.0.1:{port}", "--insecure"):
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, timeout=60, interval=0.2,
                   what="the registry's /healthz")
        tools = subprocess.run([TOOLMESH, "tools", f"http://127.0.0.1:{port}/mcp"], capture_output=True, text=True,
                               timeout=60)
    assert tools.returncode == 0, tools.stderr


def test_the_operator_starts_and_reconciles_from_the_image(real_node: RealNode, tmp_path):
    """The image's operator, on the host network with a read-only kubeconfig, turns an MCPServer into a Deployment."""
    namespace = "image-operator"
    kubeconfig = tmp_path / "kubeconfig"  # certificates inline, readable by the image's user
    kubeconfig.write_text(real_node.kubectl("config", "view", "--raw", "--flatten").stdout)
    kubeconfig.chmod(0o644)
    tmp_path.chmod(0o755)
    real_node.kubectl("apply", "-f", str(ROOT / "crds"))
    real_node.kubectl("create", "namespace", namespace)
    real_node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
        "apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": "clock"},
        "spec": {"transport": "stdio", "command": ["mcp-server-time"]},
    }))
    try:
        with container("--network", "host", "-v", f"{kubeconfig}:/etc/toolmesh/kubeconfig:ro",
                       "-e", "KUBECONFIG=/etc/toolmesh/kubeconfig", IMAGE, "operator", "--namespace", namespace,
                       "--no-webhook"):
            started = time.monotonic()
            deployment = real_node.wait_for(
                lambda: real_node.kubectl("get", "deployment", "clock", "-n", namespace, check=False).returncode == 0,
                timeout=90, what="the Deployment of MCPServer clock")
            assert deployment
            print(f"operator from the image: Deployment in {time.monotonic() - started:.1f}s")
    finally:
        real_node.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
