"""Bridges one stdio MCP server to many Streamable HTTP sessions: spawn or attach, one initialize, crash and restart.

    StdioUpstream(command, *, env=None, cwd=None, restart_backoff=(0.2, 5.0),
                  start_timeout=30.0, ready_timeout=10.0, timeout=300.0,
                  max_line_bytes=32 MiB, session_idle_timeout=1800.0, resume_grace=30.0,
                  max_sessions=10_000)
        Spawns `command` (a list, or a string split like a shell would) in its
        own process group; `env` is added to the sidecar's environment. Used
        for `--upstream-command "CMD ARGS"`. `timeout` is the longest silence
        on a request (progress resets it) before JSON-RPC error -32002 (504).
        `resume_grace` is how long a call whose client lost its SSE stream
        keeps running for a GET with Last-Event-ID before it is cancelled.
        A session unused for `session_idle_timeout` seconds, with nothing in
        flight and no stream open, is ended by a timer. At `max_sessions`
        (`--max-sessions`) an `initialize` ends the least recently used such
        session, or is refused with HTTP 503 when every session is busy.

    StdioUpstream.attach(fifo_dir, **same options)
        Kubernetes: the server container runs `sh -c 'CMD <in.fifo >out.fifo'`
        in an emptyDir shared with the sidecar; the bridge creates both FIFOs
        when missing, writes the server's stdin to `in.fifo` and reads its
        stdout from `out.fifo`. `start()` returns at once and the bridge
        connects whenever the server container opens its ends (`probe()` is
        false until then), so the sidecar can be up before the server.
        The server's stderr stays in its container's log.

The child speaks newline-delimited JSON-RPC. The bridge performs the one
upstream `initialize` itself (declaring sampling, elicitation and roots so the
child may use them; a session whose client lacks one gets a JSON-RPC error
on that client's behalf), answers each client's `initialize` from the cached
result with a fresh, unguessable `Mcp-Session-Id`, and swallows the clients'
`notifications/initialized`. Ids and progress tokens are rewritten by the
`Multiplexer` so sessions never collide. A stdio server serves one protocol
era per process, so 2026-07-28 requests (no `Mcp-Session-Id`, the era's
envelope or header) go to a second child of the same command, settled in that
era by a `server/discover` at its start and checked as a Streamable HTTP
server would (routing headers, `Mcp-Param-*`, error statuses). A server
without that era, and an attached (FIFO) server, which is one process, get
them on their one child without the era's envelope, and the answers are
reshaped for that era (`resultType`, and `ttlMs: 0` where a cache hint is
required).

When the child exits (or closes stdout) every in-flight request fails with
JSON-RPC error -32001 "upstream exited" carrying the exit code and the last
stderr lines; the child is restarted with exponential backoff (reset once a
child has stayed up for a while) and re-initialized. Requests that arrive
while it is down wait up to `ready_timeout` for it. Lines that are not JSON,
or longer than `max_line_bytes`, are logged and skipped. Each stderr line goes
to the `toolmesh.sidecar.stdio` logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shlex
import signal
import stat
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION

from toolmesh.sidecar.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from toolmesh.sidecar.transports.base import UpstreamResponse, json_response
from toolmesh.sidecar.transports.bridge import Channel, MessageBridge
from toolmesh.sidecar.transports.channel import Multiplexer
from toolmesh.sidecar.transports.sessions import ClientSession
from toolmesh.sidecar.transports.stateless import ToolSchemas, discover_params, serves_stateless_era

log = logging.getLogger("toolmesh.sidecar.stdio")

_CHUNK = 1 << 16
_STDERR_KEPT = 20
"""Last stderr lines reported with an exit."""
_STABLE_AFTER = 10.0
"""A child that ran this long (seconds) before exiting restarts after the shortest backoff again."""
_CLIENT_INFO = {"name": "toolmesh-sidecar", "version": "0.1.0"}
_CAPABILITIES = {"sampling": {}, "elicitation": {"form": {}, "url": {}}, "roots": {"listChanged": True}}


async def read_lines(reader: asyncio.StreamReader, on_line: Callable[[bytes], None], max_bytes: int,
                     what: str) -> None:
    """Call `on_line` with each newline-terminated line until EOF; lines over `max_bytes` are skipped whole."""
    pieces: list[bytes] = []
    size = 0
    skipping = False
    while chunk := await reader.read(_CHUNK):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            part = chunk[start:end]
            start = end + 1
            if skipping:
                skipping = False
                continue
            if pieces:
                pieces.append(part)
                part = b"".join(pieces)
                pieces, size = [], 0
            if len(part) > max_bytes:
                log.warning("skipped a line of %s longer than %d bytes", what, max_bytes)
                continue
            on_line(part)
        if start < len(chunk) and not skipping:
            tail = chunk[start:]
            size += len(tail)
            if size > max_bytes:
                log.warning("skipped a line of %s longer than %d bytes", what, max_bytes)
                pieces, size, skipping = [], 0, True
            else:
                pieces.append(tail)
    if pieces and not skipping:
        on_line(b"".join(pieces))


class _Link:
    """One live connection to the child: where to write, what to read, and how to end it."""

    def __init__(self, writer: asyncio.StreamWriter, stdout: asyncio.StreamReader,
                 stderr: asyncio.StreamReader | None = None, process: asyncio.subprocess.Process | None = None,
                 close_read: Callable[[], None] = lambda: None):
        self.writer = writer
        self.stdout = stdout
        self.stderr = stderr
        self.process = process
        self.close_read = close_read


SIDECAR_ONLY_ENV = frozenset({"TOOLMESH_REGISTRY_SECRET", "TOOLMESH_REGISTRY_SECRET_FILE"})
"""Environment variables of the sidecar that a spawned stdio server never inherits."""


class StdioUpstream(MessageBridge):
    """An `Upstream` that is one stdio MCP server, shared by every client session (and its own one channel)."""

    answers_initialized = True

    def __init__(self, command: str | Sequence[str] = (), *, fifo_dir: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 restart_backoff: tuple[float, float] = (0.2, 5.0), start_timeout: float = 30.0,
                 ready_timeout: float = 10.0, probe_timeout: float = 5.0, timeout: float | None = 300.0,
                 max_line_bytes: int = 32 << 20, session_idle_timeout: float = 1800.0, era: str = "session",
                 resume_grace: float = 30.0, max_sessions: int = 10_000):
        super().__init__(max_sessions=max_sessions, session_idle_timeout=session_idle_timeout)
        self.command = shlex.split(command) if isinstance(command, str) else list(command)
        if bool(self.command) == (fifo_dir is not None):
            raise ValueError("a stdio upstream needs either a command or a FIFO directory")
        self._fifo_dir = Path(fifo_dir) if fifo_dir is not None else None
        # The server gets the sidecar's environment but for the sidecar's own credentials: a server that can
        # read the heartbeat secret could announce itself to the registry as any server and receive callers' tokens.
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in SIDECAR_ONLY_ENV}
        self.cwd = cwd
        self.restart_backoff = restart_backoff
        self.start_timeout = start_timeout
        self.ready_timeout = ready_timeout
        self.probe_timeout = probe_timeout
        self.max_line_bytes = max_line_bytes
        self._era = era
        """"session" (initialize, then any number of client sessions) or "stateless" (server/discover, no sessions)."""
        self._stateless: StdioUpstream | None = None
        self._stateless_lock = asyncio.Lock()
        self._no_stateless_era = self._fifo_dir is not None or era != "session"
        self.mux = Multiplexer(self._write, timeout=timeout, resume_grace=resume_grace)
        self.schemas = ToolSchemas(self.mux, probe_timeout)
        self._link: _Link | None = None
        self._ready = asyncio.Event()
        self._init_result: dict[str, Any] = {}
        self._stderr: deque[str] = deque(maxlen=_STDERR_KEPT)
        self._last_exit: dict[str, Any] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._first_start: asyncio.Future[None] | None = None
        self._closing = False
        self.restarts = 0
        """How many times the child was started again after an exit."""

    @classmethod
    def attach(cls, fifo_dir: str | os.PathLike[str], **options: Any) -> StdioUpstream:
        """Bridge a server whose stdin/stdout are `fifo_dir/in.fifo` and `fifo_dir/out.fifo` (Kubernetes)."""
        return cls(fifo_dir=fifo_dir, **options)

    # -- Upstream ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._start_sweeper()
        if self._fifo_dir is not None:
            # The FIFOs exist once start() returns, so the server container can open its ends.
            for name in ("in.fifo", "out.fifo"):
                _ensure_fifo(self._fifo_dir / name)
            self._supervisor = asyncio.create_task(self._supervise(), name="stdio upstream")
            return
        self._first_start = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(self._supervise(), name="stdio upstream")
        try:
            await self._first_start
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._closing = True
        if self._stateless is not None:
            await self._stateless.close()
        await self._stop_sweeper()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self.mux.fail_all(UpstreamUnavailable("upstream closed"))
        self.mux.end_streams()

    async def probe(self) -> bool:
        if not self._ready.is_set():
            return False
        try:
            answer = await self.mux.call_own("ping", None, self.probe_timeout)
        except ProxyError:
            return False
        return "result" in answer

    # -- state others may read ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while a child is initialized and answering."""
        return self._ready.is_set()

    @property
    def pid(self) -> int | None:
        """The running child's process id (None when attached or down)."""
        link = self._link
        return link.process.pid if link is not None and link.process is not None else None

    # -- the bridge's channels: this one child, and a second one for the stateless era --------------------------

    async def _own_channel(self) -> Channel:
        return self

    async def _stateless_channel(self) -> Channel | None:
        """A second child of the same command for stateless-era requests (a stdio server serves one era per process)."""
        async with self._stateless_lock:
            if self._stateless is None and not self._no_stateless_era and not self._closing:
                stateless = StdioUpstream(self.command, env=None, cwd=self.cwd, restart_backoff=self.restart_backoff,
                                          start_timeout=self.start_timeout, ready_timeout=self.ready_timeout,
                                          probe_timeout=self.probe_timeout, timeout=self.mux.timeout,
                                          max_line_bytes=self.max_line_bytes, era="stateless")
                stateless.env = self.env
                stateless.resumable = self.resumable
                try:
                    await stateless.start()
                except UpstreamUnavailable as exc:
                    # No stateless era: the session-era child answers such requests itself.
                    log.info("the stdio upstream does not serve the 2026-07-28 protocol: %s", exc.data)
                    self._no_stateless_era = True
                else:
                    self._stateless = stateless
            return self._stateless

    def _session(self, session_id: str) -> tuple[Channel, ClientSession] | None:
        session = self.mux.sessions.get(session_id)
        return None if session is None else (self, session)

    def _sessions(self) -> list[tuple[Channel, ClientSession]]:
        return [(self, session) for session in self.mux.sessions.values()]

    def _session_count(self) -> int:
        return len(self.mux.sessions)

    def _muxes(self) -> list[Multiplexer]:
        return [self.mux, *(self._stateless._muxes() if self._stateless is not None else ())]

    async def _new_session(self, message: dict[str, Any], body: bytes | None) -> UpstreamResponse:
        """Answer the client's initialize from the child's own, under a fresh session id."""
        await self.wait_ready()
        params = message.get("params")
        session = self.mux.new_session(params)
        result = dict(self._init_result)
        asked = params.get("protocolVersion") if isinstance(params, dict) else None
        if _older_or_same(asked, result.get("protocolVersion")):
            # The child agreed to a newer session-era revision; a server speaking it also speaks the older ones.
            result["protocolVersion"] = asked
        return json_response(200, {"jsonrpc": "2.0", "id": message["id"], "result": result},
                             {"Mcp-Session-Id": session.id})

    async def _end_session(self, channel: Channel, session: ClientSession) -> None:
        await self.mux.end_session(session)

    async def wait_ready(self) -> None:
        if self._ready.is_set():
            return
        if self._closing:
            raise UpstreamUnavailable("upstream closed")
        try:
            await asyncio.wait_for(self._ready.wait(), self.ready_timeout)
        except TimeoutError:
            raise UpstreamUnavailable("upstream not running", data=self._last_exit) from None

    # -- the child --------------------------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        link = self._link
        if link is None or link.writer.is_closing():
            raise UpstreamUnavailable("upstream not running", data=self._last_exit)
        try:
            link.writer.writelines((data, b"\n"))
            if link.writer.transport.get_write_buffer_size() > _CHUNK:
                # A child that stops reading its stdin must not hang every caller behind it.
                await asyncio.wait_for(link.writer.drain(), self.mux.timeout)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise UpstreamUnavailable("upstream exited", data=self._last_exit) from exc
        except TimeoutError:
            raise UpstreamTimeout("upstream does not read its input") from None

    async def _supervise(self) -> None:
        failures = 0
        while not self._closing:
            began = time.monotonic()
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed start is retried like an exit
                self._last_exit = {"exitCode": None, "stderr": list(self._stderr), "reason": str(exc)}
                log.warning("stdio upstream failed to start: %s", exc)
                self._settle_first(UpstreamUnavailable("upstream failed to start", data=self._last_exit))
            if self._closing:
                return
            failures = 0 if time.monotonic() - began > _STABLE_AFTER else failures + 1
            base, most = self.restart_backoff
            delay = min(most, base * 2 ** max(0, failures - 1))
            log.warning("restarting the stdio upstream in %.2fs", delay)
            await asyncio.sleep(delay)
            self.restarts += 1

    def _settle_first(self, error: BaseException | None) -> None:
        first = self._first_start
        if first is not None and not first.done():
            if error is None:
                first.set_result(None)
            else:
                first.set_exception(error)

    async def _run_once(self) -> None:
        """Start or attach one child, initialize it, and return once it has gone."""
        link = await (self._attach_fifos() if self._fifo_dir is not None else self._spawn())
        self._link = link
        self._stderr.clear()
        stderr_task = asyncio.create_task(self._pump_stderr(link.stderr)) if link.stderr is not None else None
        stdout_task = asyncio.create_task(
            read_lines(link.stdout, self._on_line, self.max_line_bytes, "upstream output"))
        initialize = asyncio.ensure_future(self._initialize() if self._era == "session" else self._discover())
        try:
            await asyncio.wait((initialize, stdout_task), return_when=asyncio.FIRST_COMPLETED)
            failure = _failure(initialize)
            if failure is None:
                self._ready.set()
                self._settle_first(None)
                with contextlib.suppress(Exception):
                    await stdout_task
            else:
                log.warning("stdio upstream did not initialize: %s", failure)
                stdout_task.cancel()
                await self._stop(link, grace=0.0)
                await self._reap(link)
                await _finish(stderr_task)
                self._settle_first(UpstreamUnavailable("upstream failed to initialize", data={
                    "exitCode": link.process.returncode if link.process else None,
                    "stderr": list(self._stderr), "reason": failure}))
        finally:
            initialize.cancel()
            self._ready.clear()
            self._link = None
            if self._closing or not stdout_task.done():
                stdout_task.cancel()
                await self._stop(link, grace=2.0)
            exit_code = await self._reap(link)
            await _finish(stderr_task)
            self._last_exit = {"exitCode": exit_code, "stderr": list(self._stderr)}
            if not self._closing:
                log.warning("stdio upstream exited (code %s)", exit_code)
            self.mux.fail_all(UpstreamUnavailable("upstream exited", data=self._last_exit))
            with contextlib.suppress(Exception):
                link.writer.close()
            link.close_read()

    async def _initialize(self) -> None:
        answer = await self.mux.call_own("initialize", {
            "protocolVersion": LATEST_HANDSHAKE_VERSION,
            "capabilities": _CAPABILITIES,
            "clientInfo": _CLIENT_INFO,
        }, self.start_timeout)
        result = answer.get("result")
        if not isinstance(result, dict):
            raise UpstreamUnavailable("upstream refused initialize", data=answer.get("error"))
        self._init_result = result
        await self.mux.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        for uri in self.mux.subscribed_uris():
            # A restarted child knows nothing of the subscriptions its sessions hold.
            await self.mux.call_own("resources/subscribe", {"uri": uri}, self.start_timeout)
        info = result.get("serverInfo") or {}
        log.info("stdio upstream ready: %s %s (protocol %s)", info.get("name"), info.get("version"),
                 result.get("protocolVersion"))

    async def _discover(self) -> None:
        """Open a child in the stateless era: its first message, server/discover, settles its era."""
        answer = await self.mux.call_own("server/discover", discover_params(_CLIENT_INFO), self.start_timeout)
        if not serves_stateless_era(answer):
            raise UpstreamUnavailable("upstream does not serve the 2026-07-28 protocol", data=answer.get("error"))
        self._init_result = answer["result"]
        log.info("stdio upstream serving the 2026-07-28 protocol")

    def _on_line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            self.mux.receive(line)
        except Exception:  # noqa: BLE001 - one bad message never stops the bridge
            log.exception("could not route a message from the stdio upstream")

    async def _pump_stderr(self, reader: asyncio.StreamReader) -> None:
        def on_line(line: bytes) -> None:
            text = line.decode("utf-8", "replace").rstrip("\r")
            self._stderr.append(text[:2000])
            log.info("%s", text)

        await read_lines(reader, on_line, self.max_line_bytes, "upstream stderr")

    async def _spawn(self) -> _Link:
        process = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self.env, cwd=self.cwd, start_new_session=True,
        )
        log.info("started stdio upstream %s (pid %d)", shlex.join(self.command), process.pid)
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        return _Link(process.stdin, process.stdout, process.stderr, process)

    async def _stop(self, link: _Link, grace: float) -> None:
        """End the child: close its stdin, then SIGTERM, then SIGKILL (the MCP stdio shutdown order)."""
        with contextlib.suppress(Exception):
            link.writer.close()
        process = link.process
        if process is None or process.returncode is not None:
            return
        for sig, wait in ((None, grace), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), wait)
                return

    async def _reap(self, link: _Link) -> int | None:
        process = link.process
        if process is None:
            return None
        try:
            return await asyncio.wait_for(process.wait(), 2.0)
        except TimeoutError:
            # Closed stdout yet still running: it cannot serve MCP any more.
            await self._stop(link, grace=0.0)
            return process.returncode

    async def _attach_fifos(self) -> _Link:
        assert self._fifo_dir is not None
        to_server, from_server = self._fifo_dir / "in.fifo", self._fifo_dir / "out.fifo"
        for path in (to_server, from_server):
            _ensure_fifo(path)
        loop = asyncio.get_running_loop()
        # Non-blocking read end first: epoll stays quiet until the server's shell opens its write end.
        read_fd = os.open(from_server, os.O_RDONLY | os.O_NONBLOCK)
        try:
            write_fd = await self._open_writer(to_server)
        except BaseException:
            os.close(read_fd)
            raise
        reader = asyncio.StreamReader(limit=self.max_line_bytes)
        read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                         os.fdopen(read_fd, "rb", 0))
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(loop=loop), os.fdopen(write_fd, "wb", 0))
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        log.info("attached to the stdio upstream through %s", self._fifo_dir)
        return _Link(writer, reader, close_read=read_transport.close)

    async def _open_writer(self, path: Path) -> int:
        """Open the server's stdin FIFO once its shell has opened the other end (ENXIO until then)."""
        pause = 0.01
        while True:
            try:
                return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
            await asyncio.sleep(pause)  # the server container may take long to start; poll gently
            pause = min(0.25, pause * 2)


def _ensure_fifo(path: Path) -> None:
    try:
        os.mkfifo(path, 0o600)
        # The server container may run as another user of the pod's fsGroup.
        os.chmod(path, 0o666)
        return
    except FileExistsError:
        pass  # the server container's wrapper made it first
    if not stat.S_ISFIFO(path.stat().st_mode):
        raise UpstreamUnavailable(f"{path} exists and is not a FIFO")


async def _finish(stderr_task: asyncio.Task[None] | None) -> None:
    """Let the stderr pump read what the child wrote before it went (briefly), then stop it."""
    if stderr_task is None:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.shield(stderr_task), 1.0)
    stderr_task.cancel()


def _failure(initialize: asyncio.Future[None]) -> str | None:
    """Why the child did not initialize, or None when it did."""
    if not initialize.done():
        return "the upstream closed its output before answering initialize"
    if initialize.cancelled():
        return "cancelled"
    exc = initialize.exception()
    if exc is None:
        return None
    return exc.message if isinstance(exc, ProxyError) else repr(exc)


def _older_or_same(asked: Any, agreed: Any) -> bool:
    versions = HANDSHAKE_PROTOCOL_VERSIONS
    return asked in versions and agreed in versions and versions.index(asked) <= versions.index(agreed)
