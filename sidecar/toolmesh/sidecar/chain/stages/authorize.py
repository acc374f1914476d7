"""Authorize stage: per-tool, per-resource and per-prompt scopes (any-of, globs), list filtering, and the audit line for every decision."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from toolmesh.api.policy import AmbiguousUri, AuthorizationPolicy, MCPToolPolicySpec
from toolmesh.sidecar.telemetry import stage_metrics
from toolmesh.sidecar.chain.stages.audit import AuditLog, audit_log_for
from toolmesh.sidecar.chain.frame import NOTIFICATION, REQUEST, CallContext, Caller, Handler, Outcome
from toolmesh.sidecar.errors import INVALID_PARAMS, Forbidden, Refused, Unauthenticated
from toolmesh.sidecar.chain.protected_resource import challenge
from toolmesh.sidecar.chain.stages.results_store import PREFIX as RESULTS_PREFIX
from toolmesh.sidecar.chain.state import SharedState

NAME = "authorize"

# The sidecar's own results pages are served by the budget stage to the subject they were made
# for only, so rules do not apply to them; only this exact form is theirs, anything else under
# toolmesh:// (or a subscription to it) goes through the rules like any URI.
_RESULTS_PAGE = re.compile(re.escape(RESULTS_PREFIX) + r"[A-Za-z0-9_-]{1,64}(?:\?page=[0-9]{1,9})?")

_MEMO_SIZE = 4096
"""Names whose required scopes are remembered per policy; a flood of made-up names only resets the memo."""

_SHOWN = 200
"""Characters of a caller's name or URI repeated in an error message."""

# method → (kind of target, params key naming it); completion/complete names its target in `ref`.
_GUARDED = {
    "tools/call": ("tool", "name"),
    "resources/read": ("resource", "uri"),
    "resources/subscribe": ("resource", "uri"),
    "resources/unsubscribe": ("resource", "uri"),
    "prompts/get": ("prompt", "name"),
}
COMPLETE = "completion/complete"
# completion ref type → (kind of target, ref key naming it)
_COMPLETION_REFS = {"ref/prompt": ("prompt", "name"), "ref/resource": ("resource", "uri")}
# method → (result key of the listed items, item key naming each, kind of target)
_LISTS = {
    "tools/list": ("tools", "name", "tool"),
    "resources/list": ("resources", "uri", "resource"),
    "resources/templates/list": ("resourceTemplates", "uriTemplate", "resource"),
    "prompts/list": ("prompts", "name", "prompt"),
}


class InvalidTarget(Refused):
    """Give up: the call names its target in a way a server could read otherwise than the rules, or not at all.

    A JSON-RPC INVALID_PARAMS error at HTTP 200, as the sidecar's other INVALID_PARAMS answers are.
    """

    status = 200
    code = INVALID_PARAMS


class InvalidTargetNotification(InvalidTarget):
    """The same refusal of a notification: no JSON-RPC answer reaches it, so the HTTP status says it (400)."""

    status = 400


def _invalid(ctx: CallContext, message: str, data: Any = None) -> InvalidTarget:
    return (InvalidTargetNotification if ctx.kind == NOTIFICATION else InvalidTarget)(message, data=data)


def allowed(required: list[str], caller: Caller | None) -> bool:
    """Any-of: an empty requirement admits everyone; otherwise the caller needs one of the scopes."""
    if not required:
        return True
    return caller is not None and not caller.scopes.isdisjoint(required)


def _shown(target: str) -> str:
    return target if len(target) <= _SHOWN else target[:_SHOWN] + "…"


class AuthorizeStage:
    """Refuses calls the caller's scopes do not cover (403 insufficient_scope) and hides what it may not use from lists.

    Requests and notifications alike: a `tools/call` sent without an id is judged, audited and, when
    denied, dropped with the same error status a request would get.
    """

    def __init__(self, policy: MCPToolPolicySpec, authorization: AuthorizationPolicy | None, audit: AuditLog | None,
                 server_name: str | None, shared: SharedState | None = None):
        self.decisions = stage_metrics.counter(
            shared, "toolmesh_authz_decisions_total",
            "Authorization decisions on tools, resources and prompts (allowed true/false).", ("kind", "allowed"))
        self.auth = policy.auth
        self.authorization = authorization
        self.audit = audit
        self.server_name = server_name
        self._required: dict[str, Callable[[str], list[str]]] = {}
        self._memo: dict[tuple[str, str], list[str] | AmbiguousUri] = {}
        if authorization is not None:
            self._required = {
                "tool": authorization.tool_scopes,
                "resource": authorization.resource_scopes,
                "prompt": authorization.prompt_scopes,
            }

    async def __call__(self, ctx: CallContext, call_next: Handler) -> Outcome:
        kind = ctx.kind
        if kind != REQUEST and kind != NOTIFICATION:
            return await call_next(ctx)
        method = ctx.method
        guarded = _GUARDED.get(method)
        if guarded is not None:
            target = ctx.params.get(guarded[1])
            self._decide(ctx, guarded[0], target if isinstance(target, str) else "")
            return await call_next(ctx)
        if method == COMPLETE:
            completed = self._completion_target(ctx)
            if completed is not None:
                self._decide(ctx, *completed)
            elif self.authorization is not None:
                self._record(ctx, None, "", False, "completion ref names neither a prompt nor a resource")
                raise _invalid(ctx, "completion/complete needs a ref {type: ref/prompt, name} or {type: ref/resource, uri}")
            return await call_next(ctx)
        listed = _LISTS.get(method)
        # A list sent as a notification is filtered too, should the upstream answer it all the same.
        if listed is not None and self.authorization is not None and self.authorization.filterLists:
            outcome = await call_next(ctx)
            return self._filter(outcome, ctx.caller, *listed)
        return await call_next(ctx)

    @staticmethod
    def _completion_target(ctx: CallContext) -> tuple[str, str] | None:
        """(kind, name or URI) the completion is for, or None when its `ref` names neither a prompt nor a resource."""
        ref = ctx.params.get("ref")
        if not isinstance(ref, Mapping):
            return None
        ref_type = ref.get("type")
        found = _COMPLETION_REFS.get(ref_type) if isinstance(ref_type, str) else None
        if found is None:
            return None
        target = ref.get(found[1])
        return (found[0], target) if isinstance(target, str) else None

    def _decide(self, ctx: CallContext, kind: str, target: str) -> None:
        if kind == "resource" and ctx.method == "resources/read" and _RESULTS_PAGE.fullmatch(target):
            return
        caller = ctx.caller
        if self.authorization is None:
            self._record(ctx, kind, target, True, "no authorization rules")
            return
        required = self._scopes_for(kind, target)
        if isinstance(required, AmbiguousUri):
            self._record(ctx, kind, target, False, f"ambiguous resource URI: {required}")
            raise _invalid(ctx, f"resource URI refused: {required}", data={"uri": _shown(target)})
        if allowed(required, caller):
            granted = sorted(caller.scopes.intersection(required)) if caller and required else []
            self._record(ctx, kind, target, True, f"scope {granted[0]}" if granted else "no scope required")
            return
        needed = " ".join(required)
        self._record(ctx, kind, target, False, f"insufficient scope: needs one of [{needed}]")
        # The challenge names the scopes (policy data), never the caller's tool name or URI: it is a header.
        if self.auth is not None and (caller is None or caller.issuer is None):
            # An anonymous caller (auth not required) is told to authenticate, not that it lacks a scope.
            raise Unauthenticated(
                f"authentication required for {kind} {_shown(target)!r}",
                data={"requiredScopes": list(required)},
                headers={"WWW-Authenticate": challenge(self.auth, ctx.headers, scope=needed)},
            )
        raise Forbidden(
            f"insufficient scope for {kind} {_shown(target)!r}: needs one of {required}",
            data={"requiredScopes": list(required)},
            headers={
                "WWW-Authenticate": challenge(
                    self.auth, ctx.headers, error="insufficient_scope", scope=needed,
                    description=f"this {kind} needs one of the scopes: {needed}",
                )
            },
        )

    def _scopes_for(self, kind: str, target: str) -> list[str] | AmbiguousUri:
        """The rule lookup, remembered: the same few names come back on every call and every listing."""
        key = (kind, target)
        required = self._memo.get(key)
        if required is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            try:
                required = self._required[kind](target)
            except AmbiguousUri as exc:
                required = exc
            self._memo[key] = required
        return required

    def _visible(self, kind: str, name: str, caller: Caller | None) -> bool:
        required = self._scopes_for(kind, name)
        return not isinstance(required, AmbiguousUri) and allowed(required, caller)

    def _record(self, ctx: CallContext, kind: str | None, target: str, ok: bool, reason: str) -> None:
        self.decisions.inc(kind or "completion", "true" if ok else "false")
        if self.audit is None:
            return
        self.audit.record(
            request_id=ctx.request_id,
            subject=ctx.caller.subject if ctx.caller is not None else None,
            method=ctx.method,
            allowed=ok,
            reason=reason,
            session_id=ctx.session_id,
            server=self.server_name,
            **({kind: target} if kind else {}),
        )

    def _filter(self, outcome: Outcome, caller: Caller | None, items_key: str, name_key: str, kind: str) -> Outcome:
        message = outcome.parsed()
        if not isinstance(message, Mapping):
            return outcome
        result = message.get("result")
        if not isinstance(result, Mapping) or not isinstance(result.get(items_key), list):
            return outcome
        items = result[items_key]
        kept = [
            item for item in items
            if isinstance(item, Mapping) and isinstance(item.get(name_key), str)
            and self._visible(kind, item[name_key], caller)
        ]  # fmt: skip
        if len(kept) == len(items):
            return replace(outcome, message=message)
        # Pagination is the upstream's: nextCursor is kept, each page is filtered on its own.
        filtered = {**message, "result": {**result, items_key: kept}}
        return replace(outcome, message=filtered, raw=None)


def build(policy: MCPToolPolicySpec, shared: SharedState) -> AuthorizeStage | None:
    """The stage when the policy has `authorization` or an `audit` log; None otherwise."""
    if policy is None:
        return None
    authorization = policy.authorization
    audit = audit_log_for(policy, shared)
    if authorization is None and audit is None:
        return None
    return AuthorizeStage(policy, authorization, audit, shared.server_name, shared)
