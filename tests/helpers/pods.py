"""A real one-node Kubernetes for the real-node tier (tests/pods/): real pods from real images, on this machine.

What runs, and where it comes from:

- the images: tests/pods/images.sh builds the project image from the Dockerfile (on a base made by
  debootstrap, no registry), a pause image and the everything server, with a docker engine that
  tests/pods/dockerd.sh starts if none answers;
- the node: tests/pods/cluster.sh runs the control plane of tests/cluster/build.sh with a containerd,
  kubelet, kube-proxy and CoreDNS (tests/pods/build.sh), pods on the bridge tmbr0 (10.244.0.0/24),
  Services on 10.96.0.0/24, reachable from this host and from nowhere else.

`RealNode` is a `ControlPlane` (kubectl, helm, wait_for, ...) whose pods run. Its scripts print
progress; `run_script` streams their output to the test log.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import ROOT
from helpers.kube import ControlPlane, cluster_bin_dir

PODS_TESTS = ROOT / "tests" / "pods"
# The same files, in the same order, as HASH_INPUTS in tests/pods/build.sh.
HASH_INPUTS = (
    "build.sh",
    "go/node/go.mod", "go/node/go.sum", "go/node/tools.go",
    "go/coredns/go.mod", "go/coredns/go.sum", "go/coredns/main.go",
)
BINARIES = ("kubelet", "kube-proxy", "coredns", "pause")
NODE = "toolmesh-node"
GATEWAY_IP = "10.244.0.1"
IMAGE = "toolmesh:dev"
IMAGES = (IMAGE, "local/pause:3.10", "mcp/everything:latest")


def http_status(url: str) -> int:
    """The HTTP status of a GET, 0 when nothing answers (yet): for waiting on /healthz and /readyz."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except OSError:
        return 0


def pods_bin_dir() -> Path:
    """tests/pods/build.sh's output folder, `$TOOLMESH_CACHE/pods-<hash>/bin`; fails the test if a binary is missing."""
    listing = "".join(
        f"{hashlib.sha256((PODS_TESTS / name).read_bytes()).hexdigest()}  {name}\n" for name in HASH_INPUTS
    )
    digest = hashlib.sha256(listing.encode()).hexdigest()[:12]
    cache_root = Path(os.environ.get("TOOLMESH_CACHE") or Path.home() / ".cache" / "toolmesh")
    bin_dir = cache_root / f"pods-{digest}" / "bin"
    missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        pytest.fail(f"node binaries missing in {bin_dir} ({', '.join(missing)}): run `make cluster-bins` first",
                    pytrace=False)
    return bin_dir


def require_root() -> None:
    """The tier needs root (a docker engine, a kubelet, a bridge): a machine without it fails, it does not skip."""
    if os.geteuid() != 0:
        pytest.fail("the real-node tier needs root (dockerd, kubelet, containerd, a bridge): run it as root",
                    pytrace=False)


def run_script(script: str, *args: str, env: dict[str, str], timeout: float) -> None:
    """Run tests/pods/SCRIPT, its progress lines passed through to stderr; fail with its output's tail if it fails."""
    started = time.monotonic()
    proc = subprocess.Popen(["bash", str(PODS_TESTS / script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:  # the scripts bound their own waits; the timeout below is the backstop
            lines.append(line)
            sys.stderr.write(line)
            if time.monotonic() - started > timeout:
                proc.kill()
                break
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.returncode != 0:
        tail = "".join(lines[-40:])
        raise RuntimeError(f"tests/pods/{script} {' '.join(args)} failed ({proc.returncode}):\n{tail}")


@dataclass
class RealNode(ControlPlane):
    """A running one-node cluster whose pods run for real (see the module docstring).

    `workdir` is cluster.sh's run folder: kubeconfig, ca.crt, and every component's log.
    """

    state: Path = Path()
    pods_bin: Path = Path()
    node: str = NODE

    @property
    def ca_cert(self) -> Path:
        return self.workdir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.workdir / "ca.key"

    @property
    def logs_dir(self) -> Path:
        return self.workdir

    @property
    def script_env(self) -> dict[str, str]:
        return dict(os.environ, TOOLMESH_PODS_STATE=str(self.state), CLUSTER_BIN=str(self.bin_dir),
                    PODS_BIN=str(self.pods_bin))

    def _check_alive(self) -> None:
        for name in ("etcd", "apiserver", "kubelet", "kube-proxy", "coredns"):
            pid_file = self.workdir / f"{name}.pid"
            pid = int(pid_file.read_text()) if pid_file.exists() else 0
            if not pid or not Path(f"/proc/{pid}").exists():
                raise RuntimeError(f"{name} of the real node is not running; its log: {self.workdir / (name + '.log')}")

    def log_tails(self, lines: int = 30) -> str:
        tails = []
        for name in ("apiserver", "kubelet", "kube-proxy", "coredns"):
            log = self.workdir / f"{name}.log"
            if log.exists():
                tails.append(f"--- {name} ({log}) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)

    def load(self, *images: str) -> None:
        """Copy images from the docker engine into the node's containerd."""
        run_script("cluster.sh", "load", *images, env=self.script_env, timeout=300)

    def container_status(self, namespace: str, pod: str, container: str) -> dict:
        """What the kubelet reports of one container of a pod (app or native sidecar); {} when it reports nothing."""
        status = self.kubectl_json("get", "pod", pod, "-n", namespace)["status"]
        entries = status.get("containerStatuses", []) + status.get("initContainerStatuses", [])
        return next((entry for entry in entries if entry["name"] == container), {})

    def container_id(self, namespace: str, pod: str, container: str) -> str:
        """The containerd id of a pod's container as the kubelet reports it."""
        entry = self.container_status(namespace, pod, container)
        if not entry.get("containerID"):
            raise AssertionError(f"no running container {container} in pod {namespace}/{pod}: {json.dumps(entry)}")
        return entry["containerID"].split("://", 1)[1]

    def ctr(self, *args: str) -> subprocess.CompletedProcess:
        """`ctr` against the node's containerd, in the kubelet's namespace."""
        sock = self.state / "cluster" / "containerd" / "containerd.sock"
        return subprocess.run(["ctr", "-a", str(sock), "-n", "k8s.io", *args], check=True, capture_output=True,
                              text=True, timeout=30)

    def kill_container(self, namespace: str, pod: str, container: str) -> str:
        """SIGKILL a container's main process through the node's containerd, as an OOM kill or a crash would end it."""
        cid = self.container_id(namespace, pod, container)
        self.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        return cid

    def pause_container(self, namespace: str, pod: str, container: str) -> str:
        """Freeze a container (cgroup freezer): its processes neither run nor exit, as a hung process would."""
        cid = self.container_id(namespace, pod, container)
        self.ctr("tasks", "pause", cid)
        return cid

    def resume_container(self, namespace: str, pod: str, container: str) -> None:
        """Thaw a paused container; one the kubelet has meanwhile restarted (its liveness probe failed) runs already."""
        try:
            self.ctr("tasks", "resume", self.container_id(namespace, pod, container))
        except subprocess.CalledProcessError as exc:
            if "not paused" not in (exc.stderr or "") and "not found" not in (exc.stderr or ""):
                raise

    def restarts(self, namespace: str, pod: str, container: str) -> int:
        return int(self.container_status(namespace, pod, container).get("restartCount", 0))

    def stop(self) -> None:
        run_script("cluster.sh", "down", env=self.script_env, timeout=240)


def start_real_node(state: Path) -> RealNode:
    """Start the node in `state/cluster` (see cluster.sh); on failure everything started is taken down again."""
    node = RealNode(bin_dir=cluster_bin_dir(), workdir=state / "cluster" / "run", state=state, pods_bin=pods_bin_dir())
    started = time.monotonic()
    try:
        run_script("cluster.sh", "up", env=node.script_env, timeout=300)
    except BaseException:
        node.stop()
        raise
    node.start_seconds = time.monotonic() - started
    return node
