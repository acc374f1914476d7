"""A real `redis-server` (Debian's package) on a Unix socket in a test's folder: no TCP port to race for."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def answers(path: Path) -> bool:
    """Whether a server on the socket answers PING."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; `kill()` and `start()` again on the same socket, as a restart would."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.socket = folder / "redis.sock"
        self.log = folder / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        assert Path(REDIS_SERVER).exists(), "redis-server is missing: make system-deps installs it"
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.folder), "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(lambda: self.proc.poll() is not None or answers(self.socket), timeout=10, what="redis-server")
        assert self.proc.poll() is None, f"redis-server exited: {self.log.read_text(errors='replace')}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.socket.unlink(missing_ok=True)


@contextmanager
def redis_server(folder: Path) -> Iterator[RedisServer]:
    folder.mkdir(parents=True, exist_ok=True)
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextmanager
def tls_redis_server(folder: Path, password: str) -> Iterator[str]:
    """redis-server speaking only TLS, on a free loopback port, with a password; yields the `rediss://` URL that
    trusts its CA (a certificate for 127.0.0.1 signed by a CA made for the test)."""
    from helpers import free_port, port_open
    from helpers.kube import _make_ca, issue_cert

    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _make_ca(folder)
    cert, key = issue_cert(ca, ca_key, "redis", ips=("127.0.0.1",), server=True, out_dir=folder, stem="redis")
    port = free_port()
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
         "--requirepass", password, "--save", "", "--appendonly", "no", "--dir", str(folder),
         "--logfile", str(folder / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is not None or port_open(port), timeout=10, what="redis-server (TLS)")
        assert proc.poll() is None, f"redis-server exited: {(folder / 'redis.log').read_text(errors='replace')}"
        yield f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    finally:
        proc.kill()
        proc.wait(timeout=10)
