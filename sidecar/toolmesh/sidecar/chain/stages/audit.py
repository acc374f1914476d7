"""The audit log: one JSON line per access decision (time, request id, subject, method, target, allowed, reason), never a token."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orjson

from toolmesh.api.policy import MCPToolPolicySpec
from toolmesh.api.sessions import session_ref

from toolmesh.sidecar.chain.state import AUDIT_LOGS, SharedState

log = logging.getLogger("toolmesh.sidecar.audit")



class AuditLog:
    """Appends decision lines to stderr, stdout or a file. Each line is one `write`, so lines never interleave."""

    def __init__(self, sink: str):
        self.sink = sink
        if sink == "stderr":
            self._fd, self._owned = 2, False
        elif sink == "stdout":
            self._fd, self._owned = 1, False
        else:
            # O_APPEND: several sidecar processes (or log rotation by rename) keep whole lines.
            self._fd = os.open(sink, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._owned = True
        self.lines = 0
        """Lines written (for stats)."""

    def record(
        self,
        *,
        request_id: Any,
        subject: str | None,
        method: str,
        allowed: bool,
        reason: str,
        tool: str | None = None,
        resource: str | None = None,
        prompt: str | None = None,
        session_id: str | None = None,
        server: str | None = None,
    ) -> None:
        """Write one decision. `reason` must never carry credentials; callers pass fixed phrases and scope names."""
        now = time.time()
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
            "requestId": request_id,
            "subject": subject,
            "method": method,
            "allowed": allowed,
            "reason": reason,
        }
        if tool is not None:
            entry["tool"] = tool
        if resource is not None:
            entry["resource"] = resource
        if prompt is not None:
            entry["prompt"] = prompt
        if session_id is not None:
            # A session id is a bearer secret: whoever reads the audit log must not be able to act in it.
            entry["sessionRef"] = session_ref(session_id)
        if server is not None:
            entry["server"] = server
        try:
            os.write(self._fd, orjson.dumps(entry, default=str) + b"\n")
            self.lines += 1
        except OSError as exc:  # a full disk must not fail the call it audits
            log.warning("cannot write audit line to %s: %s", self.sink, exc)

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)
            self._owned = False


def audit_log_for(policy: MCPToolPolicySpec, shared: SharedState) -> AuditLog | None:
    """The audit log the policy asks for, or None. Logs are kept per sink across reloads so file descriptors are not leaked."""
    section = policy.audit
    if section is None or not section.enabled:
        return None
    logs = shared.kept(AUDIT_LOGS, dict)
    audit = logs.get(section.sink)
    if audit is None:
        try:
            audit = logs[section.sink] = AuditLog(section.sink)
        except OSError as exc:
            log.error("cannot open audit sink %s: %s; auditing to stderr", section.sink, exc)
            audit = logs[section.sink] = AuditLog("stderr")
    return audit
