"""Delegation: workflows of tasks run on the servers that offer a capability, in parallel where dependencies allow.

A task names a `capability` (any healthy server declaring it, in any
namespace) or a fixed `server` (its gateway name), a `tool` (default `execute_task`), `arguments`, `dependsOn` and
`timeoutSeconds`. Independent tasks start together; each goes to the
least-loaded healthy server with a free slot (`maxConcurrent`), waiting for
one up to its timeout. Results of dependencies arrive as `arguments.context`;
a failed task fails its dependants with the reason. The caller's token and
budget key travel with every task, so each sidecar applies its policy.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from toolmesh.api.sessions import ANONYMOUS, credential_principal, unguessable_id
from toolmesh.registry.backend import Notify, discard
from toolmesh.registry.catalogue import Catalogue, ServerKey
from toolmesh.registry.gateway import Caller, Gateway, Sidecars, ToolCallFailed
from toolmesh.registry.gateway.calls import json_response


class TaskSpec(BaseModel):
    """One task of a workflow."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str = Field(min_length=1)
    """Unique within the workflow; other tasks name it in `dependsOn`."""
    capability: str | None = None
    """Run on any healthy server declaring this capability."""
    server: str | None = None
    """Or run on this server."""
    tool: str = "execute_task"
    """The tool to call."""
    arguments: dict[str, Any] = Field(default_factory=dict)
    """Arguments for the tool; `context` is added with the results of dependencies."""
    dependsOn: list[str] = Field(default_factory=list)
    """Tasks that must succeed first."""
    timeoutSeconds: float = Field(default=60.0, gt=0, le=86400)
    """Deadline for waiting for a free server and running, together."""

    @model_validator(mode="after")
    def _one_target(self) -> TaskSpec:
        if (self.capability is None) == (self.server is None):
            raise ValueError(f"task {self.id}: give exactly one of capability and server")
        return self


class WorkflowSpec(BaseModel):
    """A workflow as posted to /v1/workflows or passed to `toolmesh__run_workflow`."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskSpec] = Field(min_length=1, max_length=1000)
    """The tasks; order does not matter, dependencies do."""

    @model_validator(mode="after")
    def _acyclic(self) -> WorkflowSpec:
        ids = [t.id for t in self.tasks]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate task ids: {', '.join(duplicates)}")
        known = set(ids)
        for task in self.tasks:
            unknown = [d for d in task.dependsOn if d not in known]
            if unknown:
                raise ValueError(f"task {task.id} depends on unknown task(s): {', '.join(unknown)}")
        # Kahn's algorithm: whatever cannot be put in order sits on a cycle.
        missing = {t.id: len(set(t.dependsOn)) for t in self.tasks}
        dependants: dict[str, list[str]] = {t.id: [] for t in self.tasks}
        for task in self.tasks:
            for dep in set(task.dependsOn):
                dependants[dep].append(task.id)
        ready = [i for i, n in missing.items() if n == 0]
        while ready:
            for other in dependants[ready.pop()]:
                missing[other] -= 1
                if missing[other] == 0:
                    ready.append(other)
        cyclic = sorted(i for i, n in missing.items() if n > 0)
        if cyclic:
            raise ValueError(f"dependency cycle among: {', '.join(cyclic)}")
        return self


def parse_workflow(data: Any) -> WorkflowSpec:
    """Validate a workflow; raises ValueError naming what is wrong, before anything runs."""
    try:
        return WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'workflow'}: {e['msg']}" for e in exc.errors())
        raise ValueError(reasons) from None


@dataclass(slots=True)
class TaskRun:
    """What happened to one task."""

    spec: TaskSpec
    state: str = "pending"
    """pending → waiting (for a slot) → running → succeeded | failed."""
    server: str | None = None
    result: Any = None
    """The tool's structured content, or its text."""
    error: str | None = None
    started_seq: int | None = None
    """Order in which tasks started (0, 1, ...), for seeing what ran in parallel."""
    finished_seq: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.spec.id, "state": self.state, "server": self.server, "result": self.result,
                "error": self.error, "startedSeq": self.started_seq, "finishedSeq": self.finished_seq,
                "startedAt": self.started_at, "finishedAt": self.finished_at}


@dataclass(slots=True)
class WorkflowRun:
    id: str
    """Unguessable; with the principal below, what lets its starter (and only them) read its results."""
    tasks: dict[str, TaskRun]
    principal: str = ANONYMOUS
    """Who started it (`credential_principal` of their `Authorization`): only they may read it."""
    state: str = "running"
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    scheduling_seconds: float = 0.0
    """Time spent in the scheduler itself (not waiting, not in tools), for the overhead figure."""

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "createdAt": self.created_at, "finishedAt": self.finished_at,
                "schedulingMsPerTask": round(self.scheduling_seconds * 1000 / max(1, len(self.tasks)), 4),
                "tasks": {tid: t.as_dict() for tid, t in self.tasks.items()}}


class Delegation:
    """Runs workflows over the catalogue's servers, keeping each within its `maxConcurrent`; `/v1/workflows` starts
    them and shows them to whoever started them."""

    def __init__(self, catalogue: Catalogue, sidecars: Sidecars, *, keep: int = 1000) -> None:
        self.catalogue = catalogue
        self.sidecars = sidecars
        self.runs: dict[str, WorkflowRun] = {}
        self.running: dict[ServerKey, int] = {}
        """Delegated tasks running per server now (by key: a gateway name may change while a task runs)."""
        self._slots = asyncio.Condition()
        self._keep = keep
        self._background: set[asyncio.Task] = set()
        catalogue.on_change(self._catalogue_changed)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/workflows", self.post_workflow), web.get("/v1/workflows/{id}", self.get_workflow)]

    async def post_workflow(self, request: web.Request) -> web.Response:
        """Start a workflow with the caller's identity; `?wait=true` answers when it has finished."""
        try:
            spec = parse_workflow(orjson.loads(await request.read()))
        except orjson.JSONDecodeError as exc:
            return json_response({"error": f"not JSON: {exc}"}, 400)
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        caller = Caller(request.headers.get("Authorization"), request.headers.get("Mcp-Budget-Key"))
        run = self.start(spec, caller)
        if request.query.get("wait") in ("1", "true", "yes"):
            await run.done.wait()
            return json_response(run.as_dict())
        return json_response(run.as_dict(), 202)

    async def get_workflow(self, request: web.Request) -> web.Response:
        """A workflow's state and results, for the credential that started it; to anyone else it does not exist."""
        run = self.runs.get(request.match_info["id"])
        principal = credential_principal(request.headers.get("Authorization"))
        if run is None or not secrets.compare_digest(run.principal, principal):
            return json_response({"error": "no such workflow"}, 404)
        return json_response(run.as_dict())

    def start(self, spec: WorkflowSpec, caller: Caller, notify: Notify | None = None) -> WorkflowRun:
        """Begin a workflow in the background; await `run.done` for the end."""
        run = WorkflowRun(id=unguessable_id("wf-"), tasks={t.id: TaskRun(t) for t in spec.tasks},
                          principal=credential_principal(caller.authorization))
        self.runs[run.id] = run
        while len(self.runs) > self._keep:
            oldest = next(iter(self.runs))
            if not self.runs[oldest].done.is_set():
                break
            del self.runs[oldest]
        task = asyncio.get_running_loop().create_task(self._run(run, caller, notify))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return run

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _run(self, run: WorkflowRun, caller: Caller, notify: Notify | None) -> None:
        seq = itertools.count()
        finished = itertools.count(1)
        total = len(run.tasks)

        async def one(task: TaskRun) -> None:
            nonlocal notify
            await self._run_task(run, task, caller, seq)
            task.finished_seq = next(finished) - 1
            task.finished_at = time.time()
            task.done.set()
            if notify is not None:
                message = f"{task.spec.id} {task.state}" + (f": {task.error}" if task.error else "")
                try:
                    await notify({"progress": task.finished_seq + 1, "total": total, "message": message})
                except Exception:  # noqa: BLE001 - a caller gone away must not stop the workflow
                    notify = None

        try:
            await asyncio.gather(*(one(t) for t in run.tasks.values()))
        finally:
            run.state = "succeeded" if all(t.state == "succeeded" for t in run.tasks.values()) else "failed"
            run.finished_at = time.time()
            run.done.set()

    async def _run_task(self, run: WorkflowRun, task: TaskRun, caller: Caller, seq: itertools.count) -> None:
        spec = task.spec
        deadline = time.monotonic() + spec.timeoutSeconds
        deps = [run.tasks[d] for d in spec.dependsOn]
        for dep in deps:
            await dep.done.wait()
        failed = [d for d in deps if d.state != "succeeded"]
        if failed:
            task.state = "failed"
            task.error = "; ".join(f"dependency {d.spec.id} failed: {d.error}" for d in failed)
            return
        t0 = time.perf_counter()
        task.state = "waiting"
        try:
            server, key = await self._acquire(spec, deadline)
        except TimeoutError as exc:
            task.state, task.error = "failed", str(exc)
            return
        task.server = server
        task.state = "running"
        task.started_seq = next(seq)
        task.started_at = time.time()
        arguments = dict(spec.arguments)
        if deps:
            arguments["context"] = {d.spec.id: d.result for d in deps}
        run.scheduling_seconds += time.perf_counter() - t0
        try:
            result = await asyncio.wait_for(
                self.sidecars.call_server(server, {"name": spec.tool, "arguments": arguments}, caller, discard),
                timeout=max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            task.state, task.error = "failed", f"timed out after {spec.timeoutSeconds:g}s on {server}"
            return
        except ToolCallFailed as exc:
            task.state, task.error = "failed", exc.message
            return
        finally:
            await self._release(key)
        text = "\n".join(c.get("text", "") for c in result.get("content") or [] if c.get("type") == "text")
        if result.get("isError"):
            task.state, task.error = "failed", text or "the tool reported an error"
            return
        structured = result.get("structuredContent")
        if isinstance(structured, dict) and set(structured) == {"result"}:
            structured = structured["result"]  # the SDK's wrapping of a plain return value
        if structured is None:
            # Agents often answer JSON as text; hand it on as data so dependants need not parse it again.
            try:
                structured = orjson.loads(text) if text[:1] in ("{", "[") else None
            except orjson.JSONDecodeError:
                structured = None
        task.result = structured if structured is not None else text
        task.state = "succeeded"

    def _candidates(self, spec: TaskSpec) -> list[str]:
        """Gateway names of the healthy servers that may run the task (capabilities match across namespaces)."""
        if spec.server is not None:
            names = [spec.server]
        else:
            names = [s for s in self.catalogue.servers() if spec.capability in self.catalogue.traits(s).capabilities]
        return [s for s in names if self.catalogue.healthy_instances(s)]

    async def _acquire(self, spec: TaskSpec, deadline: float) -> tuple[str, ServerKey]:
        """A slot on the least-loaded candidate: its gateway name and key."""
        async with self._slots:
            while True:
                free = []
                for server in self._candidates(spec):
                    key = self.catalogue.key(server)
                    if key is None:
                        continue
                    limit = self.catalogue.traits(key).max_concurrent
                    busy = self.running.get(key, 0)
                    if busy < limit:
                        free.append((busy / limit, busy, server, key))
                if free:
                    _, _, server, key = min(free)
                    self.running[key] = self.running.get(key, 0) + 1
                    return server, key
                remaining = deadline - time.monotonic()
                what = f"server {spec.server}" if spec.server else f"a server with capability {spec.capability!r}"
                if remaining <= 0:
                    raise TimeoutError(f"no free healthy {what} within {spec.timeoutSeconds:g}s")
                try:
                    await asyncio.wait_for(self._slots.wait(), timeout=remaining)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"no free healthy {what} within {spec.timeoutSeconds:g}s") from None

    async def _release(self, key: ServerKey) -> None:
        async with self._slots:
            self.running[key] = max(0, self.running.get(key, 0) - 1)
            self._slots.notify_all()

    def _catalogue_changed(self) -> None:
        # A server appearing (or coming back) may free a waiting task.
        async def wake() -> None:
            async with self._slots:
                self._slots.notify_all()

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(wake())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


RUN_WORKFLOW_TOOL: dict[str, Any] = {
    "name": "toolmesh__run_workflow",
    "description": "[toolmesh] Run a delegation workflow: tasks on servers by capability, in parallel where "
                   "dependencies allow; dependency results arrive as `context`. Progress is reported per finished task.",
    "inputSchema": {
        "type": "object",
        "properties": {"tasks": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "id": {"type": "string"}, "capability": {"type": "string"}, "server": {"type": "string"},
                "tool": {"type": "string", "default": "execute_task"}, "arguments": {"type": "object"},
                "dependsOn": {"type": "array", "items": {"type": "string"}},
                "timeoutSeconds": {"type": "number", "default": 60},
            },
            "required": ["id"],
        }}},
        "required": ["tasks"],
    },
}


def install(gateway: Gateway, delegation: Delegation) -> None:
    """Expose `toolmesh__run_workflow` at the gateway."""

    async def run_workflow(params: Mapping[str, Any], caller: Caller, notify: Notify) -> dict[str, Any]:
        try:
            spec = parse_workflow(params.get("arguments") or {})
        except ValueError as exc:
            return {"content": [{"type": "text", "text": f"invalid workflow: {exc}"}], "isError": True}
        token = ((params.get("_meta") or {}).get("progressToken"))

        async def progress(update: Mapping[str, Any]) -> None:
            await notify({"jsonrpc": "2.0", "method": "notifications/progress",
                          "params": {"progressToken": token, **update}})

        run = delegation.start(spec, caller, progress if token is not None else None)
        await run.done.wait()
        summary = run.as_dict()
        lines = [f"workflow {run.id} {run.state}"] + [
            f"- {t['id']}: {t['state']}" + (f" on {t['server']}" if t["server"] else "")
            + (f" ({t['error']})" if t["error"] else "") for t in summary["tasks"].values()]
        return {"content": [{"type": "text", "text": "\n".join(lines)}], "structuredContent": summary,
                "isError": run.state != "succeeded"}

    gateway.tools.add_local_tool(RUN_WORKFLOW_TOOL, run_workflow)

