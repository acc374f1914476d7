"""Authorize stage: per-tool, per-resource and per-prompt scopes (any-of, globs), list filtering, and the audit line for every decision."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from toolmesh.api.policy import AuthorizationPolicy
from toolmesh.sidecar import stage_metrics
from toolmesh.sidecar.audit import AuditLog, audit_log_for
from toolmesh.sidecar.chain import REQUEST, CallContext, Caller, Handler, Outcome
from toolmesh.sidecar.errors import Forbidden, Unauthenticated
from toolmesh.sidecar.protected_resource import challenge
from toolmesh.sidecar.state import SharedState

NAME = "authorize"

# The sidecar's own resources (truncated results) are guarded by the stage that serves them:
# only the subject they were made for may read them.
OWN_RESOURCE_PREFIX = "toolmesh://"

_MEMO_SIZE = 4096
"""Names whose required scopes are remembered per policy; a flood of made-up names only resets the memo."""

# method → (kind of target, params key naming it)
_GUARDED = {
    "tools/call": ("tool", "name"),
    "resources/read": ("resource", "uri"),
    "resources/subscribe": ("resource", "uri"),
    "resources/unsubscribe": ("resource", "uri"),
    "prompts/get": ("prompt", "name"),
}
# method → (result key of the listed items, item key naming each, kind of target)
_LISTS = {
    "tools/list": ("tools", "name", "tool"),
    "resources/list": ("resources", "uri", "resource"),
    "resources/templates/list": ("resourceTemplates", "uriTemplate", "resource"),
    "prompts/list": ("prompts", "name", "prompt"),
}


def allowed(required: list[str], caller: Caller | None) -> bool:
    """Any-of: an empty requirement admits everyone; otherwise the caller needs one of the scopes."""
    if not required:
        return True
    return caller is not None and not caller.scopes.isdisjoint(required)


class AuthorizeStage:
    """Refuses calls the caller's scopes do not cover (403 insufficient_scope) and hides what it may not use from lists."""

    def __init__(self, policy: Any, authorization: AuthorizationPolicy | None, audit: AuditLog | None,
                 server_name: str | None, shared: SharedState | None = None):
        self.decisions = stage_metrics.counter(
            shared, "toolmesh_authz_decisions_total",
            "Authorization decisions on tools, resources and prompts (allowed true/false).", ("kind", "allowed"))
        self.auth = getattr(policy, "auth", None)
        self.authorization = authorization
        self.audit = audit
        self.server_name = server_name
        self._required: dict[str, Callable[[str], list[str]]] = {}
        self._memo: dict[tuple[str, str], list[str]] = {}
        if authorization is not None:
            self._required = {
                "tool": authorization.tool_scopes,
                "resource": authorization.resource_scopes,
                "prompt": authorization.prompt_scopes,
            }

    async def __call__(self, ctx: CallContext, call_next: Handler) -> Outcome:
        if ctx.kind != REQUEST:
            return await call_next(ctx)
        guarded = _GUARDED.get(ctx.method)
        if guarded is not None:
            self._decide(ctx, *guarded)
            return await call_next(ctx)
        listed = _LISTS.get(ctx.method)
        if listed is not None and self.authorization is not None and self.authorization.filterLists:
            outcome = await call_next(ctx)
            return self._filter(outcome, ctx.caller, *listed)
        return await call_next(ctx)

    def _decide(self, ctx: CallContext, kind: str, key: str) -> None:
        target = ctx.params.get(key)
        target = target if isinstance(target, str) else ""
        if kind == "resource" and target.startswith(OWN_RESOURCE_PREFIX):
            return
        caller = ctx.caller
        if self.authorization is None:
            self._record(ctx, kind, target, True, "no authorization rules")
            return
        required = self._scopes_for(kind, target)
        if allowed(required, caller):
            granted = sorted(caller.scopes.intersection(required)) if caller and required else []
            self._record(ctx, kind, target, True, f"scope {granted[0]}" if granted else "no scope required")
            return
        needed = " ".join(required)
        self._record(ctx, kind, target, False, f"insufficient scope: needs one of [{needed}]")
        if self.auth is not None and (caller is None or caller.issuer is None):
            # An anonymous caller (auth not required) is told to authenticate, not that it lacks a scope.
            raise Unauthenticated(
                f"authentication required for {kind} {target!r}",
                data={"requiredScopes": list(required)},
                headers={"WWW-Authenticate": challenge(self.auth, ctx.headers, scope=needed)},
            )
        raise Forbidden(
            f"insufficient scope for {kind} {target!r}: needs one of {required}",
            data={"requiredScopes": list(required)},
            headers={
                "WWW-Authenticate": challenge(
                    self.auth, ctx.headers, error="insufficient_scope", scope=needed,
                    description=f"{kind} {target} needs one of the scopes: {needed}",
                )
            },
        )

    def _scopes_for(self, kind: str, target: str) -> list[str]:
        """The rule lookup, remembered: the same few names come back on every call and every listing."""
        key = (kind, target)
        required = self._memo.get(key)
        if required is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            required = self._memo[key] = self._required[kind](target)
        return required

    def _record(self, ctx: CallContext, kind: str, target: str, ok: bool, reason: str) -> None:
        self.decisions.inc(kind, "true" if ok else "false")
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
            **{kind: target},
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
            and allowed(self._scopes_for(kind, item[name_key]), caller)
        ]  # fmt: skip
        if len(kept) == len(items):
            return replace(outcome, message=message)
        # Pagination is the upstream's: nextCursor is kept, each page is filtered on its own.
        filtered = {**message, "result": {**result, items_key: kept}}
        return replace(outcome, message=filtered, raw=None)


def build(policy: Any, shared: SharedState) -> AuthorizeStage | None:
    """The stage when the policy has `authorization` or an `audit` log; None otherwise."""
    if policy is None:
        return None
    authorization = getattr(policy, "authorization", None)
    audit = audit_log_for(policy, shared)
    if authorization is None and audit is None:
        return None
    return AuthorizeStage(policy, authorization, audit, shared.server_name, shared)
