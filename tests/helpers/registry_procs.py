"""Running a real registry and small SDK servers as processes, and feeding heartbeats the way sidecars do."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from helpers import ROOT, TOOLMESH, free_port, listening

TOY_SERVER = ROOT / "tests" / "helpers" / "toy_mcp_server.py"
_CREDENTIALS: dict[str, str] = {}
"""Registry base URL → the bearer credential its catalogue reads need (its heartbeat secret), for `get_json`."""


@contextmanager
def registry_process(tmp_path: Path, *, interval: float = 1.0, missed: int = 3, secret: str | None = None,
                     extra: Sequence[str] = ()) -> Iterator[str]:
    """`toolmesh registry` on a free port (1 s heartbeats unless a test is about expiry); yields its base URL.

    Without a `secret` it runs `--insecure` (heartbeats and catalogue reads from anyone); with one, `get_json`
    presents it to this registry.
    """
    port = free_port()
    env = {"TOOLMESH_REGISTRY_SECRET": secret} if secret else {}
    log = tmp_path / f"registry-{port}.log"
    cmd = [TOOLMESH, "registry", "--listen", f"127.0.0.1:{port}", "--heartbeat-interval", str(interval),
           "--missed-heartbeats", str(missed), *([] if secret else ["--insecure"]), *extra]
    base = f"http://127.0.0.1:{port}"
    with listening(cmd, port, what="registry", env=env, log_path=log):
        if secret:
            _CREDENTIALS[base] = secret
        try:
            yield base
        finally:
            _CREDENTIALS.pop(base, None)


@contextmanager
def toy_server(tmp_path: Path, name: str, tools: str = "echo") -> Iterator[tuple[Any, str]]:
    """The toy SDK server as a process; yields (process, MCP URL)."""
    port = free_port()
    log = tmp_path / f"toy-{name}-{port}.log"
    with listening([sys.executable, str(TOY_SERVER), "--name", name, "--port", str(port), "--tools", tools],
                   port, what=f"toy server {name}", log_path=log) as proc:
        yield proc, f"http://127.0.0.1:{port}/mcp"


async def list_tools_of(url: str) -> list[dict[str, Any]]:
    """A server's tool definitions as its own tools/list gives them (what a sidecar's heartbeat carries)."""
    from mcp.client import Client

    async with Client(url, mode="legacy") as client:
        listed = await client.list_tools()
    return [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in listed.tools]


async def post_heartbeat(registry: str, beat: dict[str, Any], secret: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{registry}/v1/heartbeats", data=orjson.dumps(beat), headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


@contextlib.asynccontextmanager
async def beating(registry: str, beat: dict[str, Any], *, interval: float = 0.1,
                  secret: str | None = None) -> AsyncIterator[None]:
    """Send `beat` every `interval` seconds for the duration of the block, like a live sidecar.

    The beats come from a thread of their own, so a test's busy event loop never makes a live server look dead.
    """
    status, body = await post_heartbeat(registry, beat, secret)
    assert status == 200, body
    stop = threading.Event()
    data = orjson.dumps(beat)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {secret}"} if secret else {})}

    def loop() -> None:
        while not stop.wait(interval):
            request = urllib.request.Request(f"{registry}/v1/heartbeats", data=data, headers=headers, method="POST")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(request, timeout=5).read()

    thread = threading.Thread(target=loop, name=f"beats-{beat.get('server')}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 10)


async def get_json(url: str, token: str | None = None) -> Any:
    """GET a JSON document, with `token` (or the secret of the registry `registry_process` started there) as bearer."""
    token = token or next((secret for base, secret in _CREDENTIALS.items() if url.startswith(base + "/")), None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json(content_type=None)
