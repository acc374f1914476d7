"""Test helpers shared by every suite: free loopback ports, waiting on conditions, managed subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TOOLMESH = str(VENV_BIN / "toolmesh")


def toolmesh_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`toolmesh ARGS...` as a user types it, with a bare environment (plus `env`); its exit code and output."""
    return subprocess.run([TOOLMESH, *args], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the condition may not be checkable yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


async def async_wait_until(predicate: Callable[[], Awaitable[object]], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Async twin of `wait_until` for coroutine predicates."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = await predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001
            last_exc = exc
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@contextmanager
def running(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
            log_path: Path | None = None, stop_timeout: float = 5.0) -> Iterator[subprocess.Popen]:
    """Run `cmd` for the duration of the block in its own process group; SIGTERM then SIGKILL on exit.

    Output goes to `log_path` (or is discarded); on failure the test can read it.
    """
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(list(cmd), env=full_env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=stop_timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=stop_timeout)
        if log_path:
            out.close()


@contextmanager
def listening(cmd: Sequence[str], port: int, *, what: str, timeout: float = 20.0, env: dict[str, str] | None = None,
              log_path: Path | None = None) -> Iterator[subprocess.Popen]:
    """`running(cmd)` once it accepts connections on `port`; fails the test, with its log, if it exits first."""
    with running(cmd, env=env, log_path=log_path) as proc:
        wait_until(lambda: proc.poll() is not None or port_open(port), timeout=timeout, what=f"{what} to listen")
        if proc.poll() is not None:
            log = log_path.read_text(errors="replace") if log_path and log_path.exists() else ""
            raise AssertionError(f"{what} exited at start-up\n{log}")
        yield proc


async def yield_until(predicate: Callable[[], object], limit: int = 1000, what: str = "condition"):
    """Let other tasks on this event loop run until `predicate` holds; fail after `limit` turns of the loop.

    For in-process stage tests with fake clocks: no wall time passes, so a bound on loop turns replaces a deadline.
    """
    for _ in range(limit):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0)
    raise AssertionError(f"{what} did not hold after {limit} turns of the event loop")
