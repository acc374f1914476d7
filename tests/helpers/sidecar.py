"""Runs `toolmesh sidecar` as a real subprocess in front of a test upstream and waits until it is ready."""

from __future__ import annotations

import json
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from helpers import TOOLMESH, running, wait_until


@dataclass
class SidecarProcess:
    """A running sidecar: where it listens and where its JSON log goes."""

    port: int
    log_path: Path
    proc: object
    policy_path: Path | None = None
    """The policy file it watches (guarded_sidecar)."""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET `url`; (status, body) whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def ready(base: str) -> bool:
    status, _ = http_get(f"{base}/readyz", timeout=2.0)
    return status == 200


@contextmanager
def sidecar(upstream: Sequence[str], tmp_path: Path, *args: str, env: dict[str, str] | None = None,
            wait_ready: bool = True, name: str = "sidecar") -> Iterator[SidecarProcess]:
    """`upstream` is e.g. ["--upstream", URL] or ["--upstream-command", "CMD"]; extra flags follow.

    The sidecar binds a port the kernel picks (`--listen 127.0.0.1:0`) and writes it to `--port-file` once it
    listens: no port is picked ahead and lost to another process meanwhile.
    """
    port_file = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_path)) / "port"
    log_path = port_file.parent / f"{name}.log"
    cmd = [TOOLMESH, "sidecar", *upstream, "--listen", "127.0.0.1:0", "--port-file", str(port_file), *args]
    with running(cmd, env=env, log_path=log_path) as proc:
        process = SidecarProcess(port=0, log_path=log_path, proc=proc)
        try:
            wait_until(lambda: proc.poll() is not None or port_file.exists(), timeout=20, what="sidecar to listen")
            assert proc.poll() is None, f"sidecar exited: {process.log()}"
            process.port = int(port_file.read_text())
            if wait_ready:
                wait_until(lambda: ready(process.base), timeout=20, what="sidecar /readyz")
        except AssertionError:
            raise AssertionError(f"sidecar did not start; its log:\n{process.log()}") from None
        yield process


@contextmanager
def guarded_sidecar(upstream: Sequence[str], tmp_path: Path, policy: Mapping[str, Any], *args: str,
                    env: dict[str, str] | None = None, name: str = "sidecar") -> Iterator[SidecarProcess]:
    """A sidecar enforcing `policy` (an MCPToolPolicy manifest, or just its spec), written to a file it watches.

    The policy file is `sidecar.policy_path`: rewrite it to change the policy in force.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix="-policy.yaml", dir=tmp_path)[1])
    path.write_text(yaml.safe_dump(dict(policy)))
    with sidecar(upstream, tmp_path, "--policy", str(path), *args, env=env, name=name) as process:
        process.policy_path = path
        yield process


def readyz(base: str) -> tuple[int, dict]:
    status, body = http_get(f"{base}/readyz")
    return status, json.loads(body)
