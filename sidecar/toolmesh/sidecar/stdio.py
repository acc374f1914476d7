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

from toolmesh.api.sessions import session_ref
from toolmesh.sidecar.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from toolmesh.sidecar.multiplex import (
    ACCEPTED,
    ClientSession,
    Multiplexer,
    ToolSchemas,
    discover_params,
    header,
    is_modern_request,
    json_response,
    modern_rejection,
    parse_body,
    as_modern_answer,
    serve_modern,
    serves_modern,
    session_id_required,
    session_not_found,
    too_many_sessions,
    without_envelope,
)
from toolmesh.sidecar.upstream import UpstreamResponse

log = logging.getLogger("toolmesh.sidecar.stdio")

_CHUNK = 1 << 16
_STDERR_KEPT = 20
"""Last stderr lines reported with an exit."""
_STABLE_AFTER = 10.0
"""A child that ran this long (seconds) before exiting restarts after the shortest backoff again."""
_CLIENT_INFO = {"name": "toolmesh-sidecar", "version": "0.1.0"}
_CAPABILITIES = {"sampling": {}, "elicitation": {"form": {}, "url": {}}, "roots": {"listChanged": True}}
_SWEEP_EVERY = 60.0
"""Most seconds between two sweeps of idle sessions (a sweep also runs every half idle timeout, if that is sooner)."""


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


class StdioUpstream:
    """An `Upstream` that is one stdio MCP server, shared by every client session."""

    def __init__(self, command: str | Sequence[str] = (), *, fifo_dir: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 restart_backoff: tuple[float, float] = (0.2, 5.0), start_timeout: float = 30.0,
                 ready_timeout: float = 10.0, probe_timeout: float = 5.0, timeout: float | None = 300.0,
                 max_line_bytes: int = 32 << 20, session_idle_timeout: float = 1800.0, era: str = "handshake",
                 resume_grace: float = 30.0, max_sessions: int = 10_000):
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
        self.session_idle_timeout = session_idle_timeout
        self.max_sessions = max_sessions
        """Most client sessions open at once (`--max-sessions`)."""
        self._sweeper: asyncio.Task[None] | None = None
        self._modern: StdioUpstream | None = None
        self._modern_lock = asyncio.Lock()
        self._modern_unsupported = self._fifo_dir is not None or era != "handshake"
        self._mux = Multiplexer(self._write, timeout=timeout, resume_grace=resume_grace)
        self._schemas = ToolSchemas(self._mux, probe_timeout)
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


    @property
    def resumable(self) -> bool:
        """Whether clients may resume SSE streams with Last-Event-ID (see `Multiplexer.resumable`)."""
        return self._mux.resumable

    @resumable.setter
    def resumable(self, value: bool) -> None:
        self._mux.resumable = value
        if self._modern is not None:
            self._modern.resumable = value
    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_idle_sessions(), name="stdio session sweep")
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
        if self._modern is not None:
            await self._modern.close()
        for task in (self._sweeper, self._supervisor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._mux.fail_all(UpstreamUnavailable("upstream closed"))
        self._mux.end_streams()

    async def post(self, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        message = parse_body(body)
        if isinstance(message, UpstreamResponse):
            return message
        session: ClientSession | None = None
        session_id = header(headers, "Mcp-Session-Id")
        if session_id is None and is_modern_request(message, headers):
            refused = modern_rejection(message, headers)
            if refused is not None:
                return refused
            modern = await self._modern_child() if not self._modern_unsupported else None
            if modern is not None:
                return await modern._serve_modern(message, body, headers)
            if message.get("method") != "server/discover":
                # One process, one era: ask the handshake-era child, without the envelope it would refuse.
                await self._wait_ready()
                answer = await self._mux.post(without_envelope(message), None)
                return as_modern_answer(answer, str(message.get("method")))
        if isinstance(message, dict) and message.get("method") == "initialize" and "id" in message:
            return await self._open_session(message)
        if session_id is not None:
            session = self._mux.sessions.get(session_id)
            if session is None:
                return session_not_found(message)
            self._mux.touch(session)
        if isinstance(message, dict) and message.get("method") == "notifications/initialized":
            return ACCEPTED  # the bridge sent the one the child needs
        await self._wait_ready()
        return await self._mux.post(message, session, body)

    async def get(self, headers: Mapping[str, str]) -> UpstreamResponse:
        session_id = header(headers, "Mcp-Session-Id")
        if session_id is None:
            return session_id_required()
        session = self._mux.sessions.get(session_id)
        if session is None:
            return session_not_found(None)
        self._mux.touch(session)
        last_event_id = header(headers, "Last-Event-ID")
        if last_event_id is not None:
            return self._mux.resume(session, last_event_id)
        return self._mux.open_stream(session)

    async def delete(self, headers: Mapping[str, str]) -> UpstreamResponse:
        session_id = header(headers, "Mcp-Session-Id")
        session = self._mux.sessions.get(session_id) if session_id is not None else None
        if session is None:
            return session_not_found(None)
        await self._mux.end_session(session)
        return UpstreamResponse(status=200)

    async def probe(self) -> bool:
        if not self._ready.is_set():
            return False
        try:
            answer = await self._mux.call_own("ping", None, self.probe_timeout)
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

    async def _modern_child(self) -> StdioUpstream | None:
        """A second child of the same command for 2026-07-28 requests (a stdio server serves one era per process)."""
        async with self._modern_lock:
            if self._modern is None and not self._modern_unsupported and not self._closing:
                modern = StdioUpstream(self.command, env=None, cwd=self.cwd, restart_backoff=self.restart_backoff,
                                       start_timeout=self.start_timeout, ready_timeout=self.ready_timeout,
                                       probe_timeout=self.probe_timeout, timeout=self._mux.timeout,
                                       max_line_bytes=self.max_line_bytes, era="modern")
                modern.env = self.env
                try:
                    await modern.start()
                except UpstreamUnavailable as exc:
                    # Not a 2026-07-28 server: its handshake child answers such requests itself.
                    log.info("the stdio upstream does not serve the 2026-07-28 protocol: %s", exc.data)
                    self._modern_unsupported = True
                else:
                    self._modern = modern
            return self._modern

    async def _serve_modern(self, message: Any, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        """One 2026-07-28 request on the modern child, with the checks and statuses a Streamable HTTP server applies."""
        await self._wait_ready()
        return await serve_modern(self._mux, self._schemas, message, body, headers)

    # -- sessions ---------------------------------------------------------------------------------------------

    async def _open_session(self, message: dict[str, Any]) -> UpstreamResponse:
        await self._wait_ready()
        if len(self._mux.sessions) >= self.max_sessions:
            room = self._mux.least_recently_used_idle()
            if room is None:
                return too_many_sessions(message["id"], self.max_sessions)
            log.info("session limit %d reached: ended session %s, the least recently used idle one",
                     self.max_sessions, session_ref(room.id))
            await self._mux.end_session(room)
        params = message.get("params")
        session = self._mux.new_session(params)
        result = dict(self._init_result)
        asked = params.get("protocolVersion") if isinstance(params, dict) else None
        if _older_or_same(asked, result.get("protocolVersion")):
            # The child agreed to a newer handshake revision; a server speaking it also speaks the older ones.
            result["protocolVersion"] = asked
        return json_response(200, {"jsonrpc": "2.0", "id": message["id"], "result": result},
                             {"Mcp-Session-Id": session.id})

    async def _sweep_idle_sessions(self) -> None:
        """End sessions whose clients left without a DELETE, on a timer (not only when a new one opens)."""
        every = max(0.01, min(_SWEEP_EVERY, self.session_idle_timeout / 2))
        while True:
            await asyncio.sleep(every)
            for session in self._mux.idle_sessions(self.session_idle_timeout):
                log.debug("ended session %s: idle for %gs", session_ref(session.id), self.session_idle_timeout)
                await self._mux.end_session(session)

    async def _wait_ready(self) -> None:
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
                await asyncio.wait_for(link.writer.drain(), self._mux.timeout)
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
        initialize = asyncio.ensure_future(self._initialize() if self._era == "handshake" else self._discover())
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
            self._mux.fail_all(UpstreamUnavailable("upstream exited", data=self._last_exit))
            with contextlib.suppress(Exception):
                link.writer.close()
            link.close_read()

    async def _initialize(self) -> None:
        answer = await self._mux.call_own("initialize", {
            "protocolVersion": LATEST_HANDSHAKE_VERSION,
            "capabilities": _CAPABILITIES,
            "clientInfo": _CLIENT_INFO,
        }, self.start_timeout)
        result = answer.get("result")
        if not isinstance(result, dict):
            raise UpstreamUnavailable("upstream refused initialize", data=answer.get("error"))
        self._init_result = result
        await self._mux.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        for uri in self._mux.subscribed_uris():
            # A restarted child knows nothing of the subscriptions its sessions hold.
            await self._mux.call_own("resources/subscribe", {"uri": uri}, self.start_timeout)
        info = result.get("serverInfo") or {}
        log.info("stdio upstream ready: %s %s (protocol %s)", info.get("name"), info.get("version"),
                 result.get("protocolVersion"))

    async def _discover(self) -> None:
        """Open a child in the stateless era: its first message, server/discover, settles its era."""
        answer = await self._mux.call_own("server/discover", discover_params(_CLIENT_INFO), self.start_timeout)
        if not serves_modern(answer):
            raise UpstreamUnavailable("upstream does not serve the 2026-07-28 protocol", data=answer.get("error"))
        self._init_result = answer["result"]
        log.info("stdio upstream serving the 2026-07-28 protocol")

    def _on_line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            self._mux.receive(line)
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
