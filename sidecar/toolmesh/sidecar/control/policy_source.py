"""Where the sidecar's policy comes from: a file or a mounted ConfigMap directory, re-read when it changes, swapped only when valid.

Kubernetes updates a mounted ConfigMap by writing a new timestamped directory
and swapping the `..data` symlink to it, so the file's path never changes but
the file it resolves to does. The watcher therefore re-reads whatever the path
resolves to every `interval` seconds and compares the bytes: a policy is a few kB,
so this costs microseconds, and unlike mtimes (coarse on many filesystems) it
misses neither an in-place edit nor a symlink swap.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from toolmesh.api.policy import MCPToolPolicySpec, PolicyError, PolicyFile

log = logging.getLogger("toolmesh.sidecar.policy")

POLICY_FILE_NAMES = ("policy.yaml", "policy.yml", "policy.json")
"""Looked for, in this order, when `--policy` names a directory."""

OnChange = Callable[[MCPToolPolicySpec], "Awaitable[None] | None"]


def policy_file(path: str | os.PathLike[str]) -> Path:
    """The file holding the policy: `path` itself, or inside a directory `policy.yaml` (or the only YAML/JSON file)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in POLICY_FILE_NAMES:
        candidate = path / name
        if candidate.is_file():
            return candidate
    # A ConfigMap mount also holds `..data` and `..<timestamp>` entries; they start with dots.
    found = sorted(
        p for p in path.iterdir() if not p.name.startswith(".") and p.suffix in (".yaml", ".yml", ".json") and p.is_file()
    )
    if len(found) == 1:
        return found[0]
    names = ", ".join(p.name for p in found) or "none"
    raise PolicyError(f"expected {POLICY_FILE_NAMES[0]} or exactly one .yaml/.json file (found: {names})", source=str(path))


def load_policy(path: str | os.PathLike[str]) -> MCPToolPolicySpec:
    """The policy in `path` (file or directory); PolicyError naming the file and every bad field or unusable key."""
    target = policy_file(path)
    policy = PolicyFile.load(target)
    check_keys(policy, source=str(target))
    return policy


def check_keys(policy: MCPToolPolicySpec, *, source: str | None = None) -> None:
    """Fail now, not on the first call, when a PEM key does not load or an HMAC secret cannot be read."""
    if policy.auth is None:
        return
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    for index, issuer in enumerate(policy.auth.issuers):
        where = f"auth.issuers[{index}]"
        try:
            if issuer.publicKey:
                load_pem_public_key(issuer.publicKey.encode())
            elif issuer.is_hmac and not issuer.resolve_secret():
                raise PolicyError("the HMAC secret is empty")
        except (ValueError, TypeError) as exc:
            detail = str(exc) if isinstance(exc, PolicyError) else f"publicKey does not load: {exc}"
            raise PolicyError(f"{where}: {detail}", source=source, fields=[where]) from None


def read_policy_bytes(path: str | os.PathLike[str]) -> tuple[Path, bytes] | None:
    """The policy file behind `path` and its bytes; None when there is none to read right now."""
    try:
        target = policy_file(path)
        return target, target.read_bytes()
    except (OSError, PolicyError):
        return None


class PolicyWatcher:
    """Keeps `current` in step with the policy at `path`; a new valid policy is handed to `on_change`, a bad one is logged and ignored.

    `on_change` (sync or async) installs the policy — e.g. rebuilds the chain. If it
    raises (a key that does not load, a secret that is missing), the policy is treated
    as invalid too and the one in force stays.
    """

    def __init__(self, path: str | os.PathLike[str], on_change: OnChange | None = None, *, interval: float = 1.0):
        self.path = Path(path)
        self.on_change = on_change
        self.interval = interval
        self.current: MCPToolPolicySpec = load_policy(self.path)
        """The policy in force."""
        seen = read_policy_bytes(self.path)
        self._content = seen[1] if seen is not None else None
        """The bytes last read, valid or not: only a change of them is parsed again."""
        self.reloads = 0
        """Policies swapped in since start."""
        self.rejected = 0
        """New policies refused as invalid since start."""
        self.last_error: str | None = None
        """Why the last new policy was refused (None after a successful swap)."""
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """Look once; True when a new policy was swapped in."""
        seen = read_policy_bytes(self.path)
        if seen is None or seen[1] == self._content:
            return False
        target, content = seen
        # Remembered even when invalid: a half-written file is reported once, and read again when it changes.
        self._content = content
        try:
            policy = PolicyFile.loads(content, source=str(target))
            check_keys(policy, source=str(target))
            if policy == self.current:
                return False
            if self.on_change is not None:
                result = self.on_change(policy)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:  # noqa: BLE001 - any failure keeps the policy in force
            self.rejected += 1
            self.last_error = str(exc)
            log.error("ignoring the new policy in %s, keeping the one in force: %s", self.path, exc)
            return False
        self.current = policy
        self.reloads += 1
        self.last_error = None
        log.info("policy reloaded from %s", self.path)
        return True

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad poll
                log.exception("policy watcher poll failed")

    def start(self) -> asyncio.Task[None]:
        """Start polling in the background (the running loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="policy-watcher")
        return self._task

    async def stop(self) -> None:
        """Stop polling."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


POLL_SECONDS_ENV = "TOOLMESH_POLICY_POLL_SECONDS"
"""Overrides how often the policy file is re-read (default 1 s)."""


def attach(app: Any, path: str | os.PathLike[str], pipeline: Any) -> None:
    """Watch `path` for the lifetime of the sidecar `app`, swapping `pipeline`'s chain; serve the RFC 9728 metadata of the policy in force."""
    from aiohttp import web

    from toolmesh.sidecar.chain.protected_resource import METADATA_PATH, metadata_document

    interval = float(os.environ.get(POLL_SECONDS_ENV, "1"))

    async def watch(app: web.Application) -> AsyncIterator[None]:
        watcher = PolicyWatcher(path, pipeline.swap, interval=interval)
        watcher.current = pipeline.policy or watcher.current
        watcher.start()
        try:
            yield
        finally:
            await watcher.stop()

    async def protected_resource(request: web.Request) -> web.Response:
        document = metadata_document(pipeline.policy, request.headers)
        if document is None:
            raise web.HTTPNotFound(text="this server does not require authentication\n")
        return web.json_response(document, headers={"Cache-Control": "max-age=60"})

    app.cleanup_ctx.append(watch)
    # RFC 9728 §3.1: the metadata of resource https://host/mcp is also found at the path-suffixed URL.
    app.router.add_get(METADATA_PATH, protected_resource)
    app.router.add_get(METADATA_PATH + "/{resource_path:.*}", protected_resource)
