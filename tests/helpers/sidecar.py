"""Runs `toolmesh sidecar` as a real subprocess in front of a test upstream and waits until it is ready."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import TOOLMESH, free_port, port_open, running, wait_until


@dataclass
class SidecarProcess:
    """A running sidecar: where it listens and where its JSON log goes."""

    port: int
    log_path: Path
    proc: object

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
    """`upstream` is e.g. ["--upstream", URL] or ["--upstream-command", "CMD"]; extra flags follow."""
    port = free_port()
    log_path = tmp_path / f"{name}-{port}.log"
    cmd = [TOOLMESH, "sidecar", *upstream, "--listen", f"127.0.0.1:{port}", *args]
    with running(cmd, env=env, log_path=log_path) as proc:
        process = SidecarProcess(port=port, log_path=log_path, proc=proc)
        try:
            wait_until(lambda: proc.poll() is not None or port_open(port), timeout=20, what="sidecar to listen")
            assert proc.poll() is None, f"sidecar exited: {process.log()}"
            if wait_ready:
                wait_until(lambda: ready(process.base), timeout=20, what="sidecar /readyz")
        except AssertionError:
            raise AssertionError(f"sidecar did not start; its log:\n{process.log()}") from None
        yield process


def readyz(base: str) -> tuple[int, dict]:
    status, body = http_get(f"{base}/readyz")
    return status, json.loads(body)
