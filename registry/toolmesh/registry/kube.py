"""Cluster mode: heartbeats authenticated by TokenReview, MCPServer specs read and status written through the API.

Every replica writes its own report of what its sidecars say into
`MCPServer.status.reports` (one entry per replica), and from the reports still
fresh the summary: healthyInstances (their sum), lastHeartbeat (the latest),
the Healthy condition, and the tools of a replica that hears a healthy sidecar.
Writes use optimistic concurrency (merge patch pinned to the resourceVersion,
re-read on 409), so no replica's report is lost and one replica losing its
sidecars never marks a server unhealthy that another still hears. Every
replica reads every MCPServer back: servers that beat to another replica, or to
this one before a restart, are served from their status until their own
heartbeats arrive. Nothing is shared but the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web

from toolmesh.api.kube import KubeClient, KubeError, load_api_client
from toolmesh.api.status import set_condition
from toolmesh.registry.auth import AuthResult, bearer
from toolmesh.registry.catalogue import Catalogue, ServerKey, ServerTraits

log = logging.getLogger("toolmesh.registry")

AUDIENCE = "toolmesh-registry"
"""The audience of the projected ServiceAccount tokens sidecars present."""
MCPSERVERS = "/apis/toolmesh.io/v1alpha1/mcpservers"
CONFLICT_RETRIES = 8
AUTH_CACHE_SECONDS = 60.0
REPORT_KEPT = 10
"""A replica's report older than this many heartbeat deadlines is dropped (the replica is gone)."""


def replica_name() -> str:
    """This registry replica in MCPServer.status.reports: the pod's name in a cluster (its hostname), plus the
    process id so that replicas sharing a host (local runs, tests) stay apart."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


class KubeApi(KubeClient):
    """The few calls the registry makes, plain dicts in and out (blocking; run them in a thread)."""

    def token_review(self, token: str) -> dict[str, Any]:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [AUDIENCE]}}
        return self.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=body).get("status") or {}

    def list_servers(self) -> list[dict[str, Any]]:
        return self.request("GET", MCPSERVERS).get("items", [])

    def get_server(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", _server_path(namespace, name), missing_ok=True)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str) -> None:
        body = {"metadata": {"resourceVersion": resource_version}, "status": dict(status)}
        self.request("PATCH", _server_path(namespace, name) + "/status", body=body,
                     content_type="application/merge-patch+json")


def _server_path(namespace: str, name: str) -> str:
    return f"/apis/toolmesh.io/v1alpha1/namespaces/{namespace}/mcpservers/{name}"


def rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


class ClusterSync:
    """TokenReview heartbeat auth plus the two loops that keep the catalogue and MCPServer.status in step."""

    def __init__(self, catalogue: Catalogue, api: KubeApi) -> None:
        self.catalogue = catalogue
        self.api = api
        self._verdicts: dict[str, tuple[float, AuthResult]] = {}
        self._written: dict[tuple[str, str], tuple[Any, float]] = {}
        """(namespace, name) → (what we last wrote, when), to write only what changed (and time once per interval)."""
        self._recheck: dict[tuple[str, str], float] = {}
        """(namespace, name) → when to write again although nothing changed here: other replicas' reports kept
        the server healthy, and theirs may stop."""
        self.replica = replica_name()
        self.known: dict[ServerKey, dict[str, Any]] = {}
        """(namespace, name) → MCPServer as last listed."""

    async def auth(self, header: str | None) -> AuthResult:
        token = bearer(header)
        if token is None:
            return AuthResult(False, reason="missing bearer token")
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._verdicts.get(key)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        try:
            review = await asyncio.to_thread(self.api.token_review, token)
        except Exception as exc:  # noqa: BLE001 - the API being away refuses the beat, it never crashes the registry
            return AuthResult(False, reason=f"TokenReview failed: {exc}")
        user = review.get("user") or {}
        username = str(user.get("username", ""))
        if not review.get("authenticated"):
            verdict = AuthResult(False, reason=review.get("error") or "token not authenticated")
        elif AUDIENCE not in (review.get("audiences") or []):
            verdict = AuthResult(False, reason=f"token not meant for {AUDIENCE}")
        elif not username.startswith("system:serviceaccount:"):
            verdict = AuthResult(False, reason="only ServiceAccounts send heartbeats")
        else:
            verdict = AuthResult(True, username, namespace=username.split(":")[2])
        if len(self._verdicts) > 10_000:
            self._verdicts.clear()
        self._verdicts[key] = (time.monotonic() + AUTH_CACHE_SECONDS, verdict)
        return verdict

    async def read_servers(self) -> None:
        """Declare every MCPServer's traits; serve servers that beat elsewhere from their status; drop deleted ones."""
        items = await asyncio.to_thread(self.api.list_servers)
        seen: dict[ServerKey, dict[str, Any]] = {}
        for item in items:
            meta, spec, status = item["metadata"], item.get("spec") or {}, item.get("status") or {}
            name, namespace = meta["name"], meta["namespace"]
            seen[ServerKey(namespace, name)] = item
            self.catalogue.declare(name, ServerTraits.from_fields(spec), namespace=namespace)
            seen_at = parse_time(status.get("lastHeartbeat"))
            if status.get("endpoint") and status.get("healthyInstances") and seen_at is not None:
                tools = [_tool_from_status(t) for t in status.get("tools") or []]
                self.catalogue.observe_remote(name, namespace, status["endpoint"], tools, seen_at)
        for key in set(self.known) - set(seen):
            self.catalogue.forget(key.name, namespace=key.namespace)
        self.known = seen

    async def write_statuses(self) -> None:
        """Write this replica's report of the servers it hears from, and the status all fresh reports add up to."""
        now = time.time()
        for key in self.catalogue.keys():
            namespace, name = key
            local = [i for i in self.catalogue.instances(key) if not i.remote]
            if namespace is None or not local:
                continue
            healthy = [i for i in local if i.healthy]
            last = max(i.last_seen_wall for i in local)
            tools = self.catalogue.server_tools(key) if healthy else ()
            wanted = {"tools": [_tool_status(t) for t in tools], "healthyInstances": len(healthy)}
            previous = self._written.get((namespace, name))
            if previous and previous[0] == wanted and last - previous[1] < self.catalogue.interval \
                    and now < self._recheck.get((namespace, name), float("inf")):
                continue
            try:
                recheck = await asyncio.to_thread(self._write, namespace, name, wanted, last)
                self._written[(namespace, name)] = (wanted, last)
                if recheck is None:
                    self._recheck.pop((namespace, name), None)
                else:
                    self._recheck[(namespace, name)] = recheck
            except Exception as exc:  # noqa: BLE001 - retried on the next round
                log.warning("cannot write status of MCPServer %s/%s: %s", namespace, name, exc)

    def _write(self, namespace: str, name: str, wanted: Mapping[str, Any], last: float) -> float | None:
        """Put our report in and recompute the summary; returns when to look again if other replicas' reports
        are what keeps the server healthy (they may stop), else None."""
        deadline = self.catalogue.deadline()
        ours = {"replica": self.replica, "lastHeartbeat": rfc3339(last), "healthyInstances": wanted["healthyInstances"]}
        for _ in range(CONFLICT_RETRIES):
            server = self.api.get_server(namespace, name)
            if server is None:
                return None
            status = server.get("status") or {}
            now = time.time()
            # Other replicas' reports, with when each last heard a sidecar; those of replicas long gone are dropped.
            theirs = [(report, seen) for report in status.get("reports") or []
                      if report.get("replica") != self.replica
                      and (seen := parse_time(report.get("lastHeartbeat"))) is not None
                      and now - seen < REPORT_KEPT * deadline]
            reports = [ours, *(report for report, _ in theirs)]
            # Another replica's report trails its heartbeats as an instance known from status does.
            slack = self.catalogue.deadline(remote=True)
            fresh = [(report, seen) for report, seen in theirs if now - seen < slack]
            count = wanted["healthyInstances"] + sum(int(r.get("healthyInstances") or 0) for r, _ in fresh)
            healthy = count > 0
            others = [seen for report, seen in fresh if int(report.get("healthyInstances") or 0) > 0]
            condition = {"type": "Healthy", "status": "True" if healthy else "False",
                         "reason": "HeartbeatsReceived" if healthy else "HeartbeatsMissed",
                         "message": f"{count} healthy sidecar(s) report to the registry"
                         if healthy else "no sidecar of this server reported within the heartbeat deadline",
                         "observedGeneration": server["metadata"].get("generation")}
            patch: dict[str, Any] = {
                "reports": sorted(reports, key=lambda r: r["replica"]),
                "healthyInstances": count,
                "lastHeartbeat": max(r["lastHeartbeat"] for r in reports),  # RFC 3339 UTC sorts as time
                "conditions": set_condition(status.get("conditions") or [], condition, rfc3339(now)),
            }
            if wanted["healthyInstances"] or not healthy:
                # The tools are those our sidecars list; while only other replicas hear the server, theirs stay.
                patch.update(tools=wanted["tools"], toolCount=len(wanted["tools"]))
            try:
                self.api.patch_status(namespace, name, patch, server["metadata"]["resourceVersion"])
            except KubeError as exc:
                if exc.status != 409:
                    raise
                continue
            return max(others) + slack if others and not wanted["healthyInstances"] else None
        raise KubeError(409, f"status of MCPServer {namespace}/{name} kept changing under us")


def _tool_status(tool: Mapping[str, Any]) -> dict[str, Any]:
    annotations = tool.get("annotations") or {}
    return {"name": tool["name"], "description": str(tool.get("description") or ""),
            "readOnly": annotations.get("readOnlyHint") is True}


def _tool_from_status(tool: Mapping[str, Any]) -> dict[str, Any]:
    # Status keeps names and descriptions only; the schema is open until the server's own heartbeat brings it.
    return {"name": tool["name"], "description": tool.get("description", ""), "inputSchema": {"type": "object"},
            "annotations": {"readOnlyHint": bool(tool.get("readOnly"))}}


def attach_kube(app: web.Application) -> ClusterSync:
    """Switch a registry app to cluster mode (TokenReview auth, status sync); call before the app starts."""
    from toolmesh.registry.app import CATALOGUE, SETTINGS

    sync = ClusterSync(app[CATALOGUE], KubeApi(load_api_client(), timeout=15))
    app[SETTINGS].auth = sync.auth

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        period = max(0.2, app[CATALOGUE].interval)

        async def loop() -> None:
            while True:
                for step in (sync.read_servers, sync.write_statuses):
                    try:
                        await step()
                    except Exception as exc:  # noqa: BLE001 - the API may be briefly away; try again next period
                        log.warning("cluster sync: %s", exc)
                await asyncio.sleep(period)

        try:
            await sync.read_servers()  # a restarted registry starts from what the API remembers
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot read MCPServers at start: %s", exc)
        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(sync.api.api.close)

    app.cleanup_ctx.append(lifetime)
    return sync
