"""Context-window budgets: every tool result is counted in real tokens against its session's budget and cut to fit.

The budget belongs to an MCP session, or where the stateless era has none to the
subject plus the client's `Mcp-Budget-Key` header. A stateless call with neither
is budgeted alone: nothing says which conversation it belongs to, so it gets a
full window and leaves no ledger behind (one shared ledger per subject used to
lock every later call out once spent). A ledger lives `sessionTtlSeconds` after
the last call it was charged for; refused calls do not keep it alive.

Everything that enters the caller's context counts: the text of the content and,
unless it merely repeats that text, `structuredContent` (as compact JSON). A
result larger than `resultFraction` of what is left is truncated with the notice
`[TRUNCATED: N tokens → M tokens. …]` and a `resource_link` to its full text
(content, then the structured result as JSON) at `toolmesh://results/<id>`,
which this stage serves itself, page by page, to the same subject only. The
structured result is cut in the same proportion, keeping its shape (the first
items of each array, the start of long strings), so a client that checks it
against the tool's `outputSchema` still can; if no such cut fits and still
matches the schema, it is left out and `_meta` says so. Below `minAvailable`
calls are answered with `[BUDGET EXHAUSTED: …]` and never reach the upstream.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from toolmesh.api.policy import BudgetPolicy, MCPToolPolicySpec
from toolmesh.sidecar.telemetry import stage_metrics
from toolmesh.sidecar.chain.frame import SESSION_END, CallContext, Handler, Outcome, header
from toolmesh.sidecar.errors import BUDGET_EXHAUSTED, INVALID_PARAMS, Refused
from toolmesh.sidecar.chain.stages.results_store import (
    DEFAULT_PAGE_TOKENS,
    PREFIX,
    RESULT_TTL_SECONDS,
    Page,
    ResultNotFound,
    new_result_id,
    page_uri,
    parse_uri,
    result_uri,
)
from toolmesh.sidecar.chain.state import BUDGET, SharedState, ToolCatalog
from toolmesh.sidecar.chain.stages.tokenizer import Tokenizer
from toolmesh.sidecar.store.base import ConversationStore, StoreUnavailable, store_failed
from toolmesh.sidecar.store.local import LocalStore

log = logging.getLogger("toolmesh.sidecar.budget")

NAME = "budget"
META_KEY = "io.toolmesh/budget"
"""Where a result's `_meta` reports the session's budget after the call."""
BUDGET_KEY_HEADER = "mcp-budget-key"
STATELESS_ERA = "2026-07-28"

EXHAUSTED = "[BUDGET EXHAUSTED: {available} tokens left, below the {minimum} needed for another tool call. Respond with the context you have.]"
TRUNCATED = ("\n\n[TRUNCATED: {total} tokens → {kept} tokens. The full result is at {uri} "
             "({pages} pages): read it with resources/read, or request specific sections.]")
NON_TEXT_TOKENS = 85
"""What an image, audio clip or binary resource costs in the budget: a model sees it as a small fixed token count."""
_SHORT_STRING = 64
"""Strings up to this long are kept whole when a structured result is cut (names, ids, enum values)."""
_CUT_ATTEMPTS = 8


class UnknownResult(Refused):
    """The `toolmesh://results/` link does not exist for this caller (unknown, expired, or another subject's)."""

    status = 200
    code = INVALID_PARAMS


class BudgetExhausted(Refused):
    """Give up: reading this page would overrun what is left of the session's budget."""

    status = 200
    code = BUDGET_EXHAUSTED


class BudgetState:
    """What survives policy reloads: the figures, and the ledgers and stored results kept in this process (all of
    them without a conversation store; during its outages, those the calls let through charged)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, shared: SharedState | None = None):
        self.local = LocalStore(clock=clock)
        self.truncations = 0
        self.exhausted = 0
        self.tokens_total = stage_metrics.counter(
            shared, "toolmesh_budget_tokens_total", "Tokens of tool results charged to budgets, by tool.", ("tool",))
        self.truncations_total = stage_metrics.counter(
            shared, "toolmesh_budget_truncations_total", "Tool results truncated to fit a budget.", ("tool",))
        self.exhausted_total = stage_metrics.counter(
            shared, "toolmesh_budget_exhausted_total", "Tool calls refused because the budget ran out.", ("tool",))
        self.sessions = stage_metrics.gauge(shared, "toolmesh_budget_sessions",
                                            "Conversation ledgers held in this process now.")
        self.store_errors = stage_metrics.counter(
            shared, "toolmesh_budget_store_errors_total",
            "Budget reads and writes the conversation store did not answer (onStoreError decided).")


def owner_of(ctx: CallContext) -> str:
    """Who owns what this call stores: the verified subject (with its issuer), or "anonymous"."""
    caller = ctx.caller
    if caller is None:
        return "\x00anonymous"
    return f"{caller.issuer or ''}\x00{caller.subject}"


def budget_key(ctx: CallContext) -> str | None:
    """The conversation this call is charged to, always under the verified subject.

    `Mcp-Budget-Key` names it when sent (the gateway sends one per gateway session, so every server the
    conversation reaches charges one ledger; a stateless caller names its own); else the MCP session at this
    sidecar. None for a stateless call with neither: it is budgeted alone.
    """
    key = header(ctx.headers, BUDGET_KEY_HEADER)
    if key:
        return f"conversation\x00{owner_of(ctx)}\x00{key}"
    if ctx.session_id:
        return f"session\x00{owner_of(ctx)}\x00{ctx.session_id}"
    return None


class BudgetStage:
    """Counts, truncates and refuses tool results by the session's remaining context window."""

    def __init__(self, policy: BudgetPolicy, state: BudgetState, tokenizer: Tokenizer | None = None,
                 page_tokens: int = DEFAULT_PAGE_TOKENS, tools: ToolCatalog | None = None,
                 conversations: ConversationStore | None = None):
        self.policy = policy
        self.state = state
        self.conversations: ConversationStore = conversations or state.local
        """Where ledgers and stored results live: shared by servers and replicas, or this process's own."""
        self.shared = conversations is not None
        self.tools = tools
        """The upstream's tools as listed, for the output schema a cut structured result must still match."""
        self.tokenizer = tokenizer or Tokenizer()
        self.page_tokens = page_tokens
        self.capacity = policy.totalTokens - policy.reservedForResponse - policy.reservedForSystem
        """Tokens a session may fill with tool results."""

    async def __call__(self, ctx: CallContext, call_next: Handler) -> Outcome:
        method = ctx.method
        if method == "tools/call":
            if not self.tokenizer.loaded:
                await self.tokenizer.ready()
            return await self._tool_call(ctx, call_next)
        if method == "resources/read":
            uri = ctx.params.get("uri")
            if isinstance(uri, str) and uri.startswith(PREFIX):
                if not self.tokenizer.loaded:
                    await self.tokenizer.ready()
                return await self._read_stored(ctx, uri)
        elif ctx.kind == SESSION_END and ctx.session_id and not header(ctx.headers, BUDGET_KEY_HEADER):
            await self._forget(budget_key(ctx))
        return await call_next(ctx)

    # -- the ledger: the conversation store, or this process when it does not answer and onStoreError allows --

    async def _used(self, key: str | None) -> int:
        """What the conversation has spent (0 for a call budgeted alone)."""
        if key is None:
            return 0
        try:
            return await self.conversations.ledger_used(key)
        except StoreUnavailable as exc:
            store_failed(self.policy.onStoreError, "the budget", "budget's", exc, self.state.store_errors)
            return await self.state.local.ledger_used(key)

    async def _charge(self, key: str | None, used: int, tokens: int) -> int:
        """Charge `tokens` to the conversation (seen at `used` before the call); what it has spent now. The call
        has happened: if the store does not take the charge, this process keeps it (counted, logged), and the
        answer stands."""
        if key is None:
            return used + tokens
        ttl = self.policy.sessionTtlSeconds
        if not self.shared:
            used = self.state.local.charge(key, tokens, ttl)
            self.state.sessions.set(self.state.local.ledger_count())
            return used
        # The answer does not wait for the shared store: the charge is sent now and lands before the
        # conversation's next call reads the ledger; this answer reports what was spent before it plus its own.
        charge = self.conversations.ledger_charge_soon(key, tokens, ttl)
        charge.add_done_callback(functools.partial(self._charged, key, tokens, ttl))
        return used + tokens

    def _charged(self, key: str, tokens: int, ttl: float, charge: asyncio.Future) -> None:
        if charge.cancelled():
            return
        exc = charge.exception()
        if exc is None:
            return
        self.state.store_errors.inc()
        log.warning("the budget charged %d tokens in this process only: the conversation store did not "
                    "answer (%s)", tokens, exc)
        self.state.local.charge(key, tokens, ttl)

    async def _forget(self, key: str | None) -> None:
        if key is None:
            return
        try:
            await self.conversations.ledger_forget(key)
        except StoreUnavailable:
            pass  # it expires after sessionTtlSeconds anyway
        await self.state.local.ledger_forget(key)
        if not self.shared:
            self.state.sessions.set(self.state.local.ledger_count())

    def _meta(self, used: int, **extra: Any) -> dict[str, Any]:
        return {"available": self.capacity - used, "used": used, "total": self.policy.totalTokens, **extra}

    async def _tool_call(self, ctx: CallContext, call_next: Handler) -> Outcome:
        key = budget_key(ctx)
        used = await self._used(key)
        available = self.capacity - used
        if available < self.policy.minAvailable:
            self.state.exhausted += 1
            self.state.exhausted_total.inc(stage_metrics.tool_label(ctx.tool, self.tools))
            text = EXHAUSTED.format(available=max(available, 0), minimum=self.policy.minAvailable)
            result = {"content": [{"type": "text", "text": text}], "isError": True,
                      "_meta": {META_KEY: self._meta(used, exhausted=True)}, **_era_fields(ctx)}
            return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": result})

        outcome = await call_next(ctx)
        message = outcome.parsed()
        result = message.get("result") if _is_map(message) else None
        if not _is_map(result):
            return outcome  # errors cost nothing: the agent sees a short error either way

        limit = int(max(available, 0) * self.policy.resultFraction)
        content = result.get("content")
        items = content if isinstance(content, list) else []
        tokens = self._count(items)
        structured = result.get("structuredContent")
        structured_json: str | None = None
        structured_tokens = 0
        if structured is not None and not _repeats_text(structured, items):
            structured_json = orjson.dumps(structured).decode()
            structured_tokens = self.tokenizer.count(structured_json)
            tokens += structured_tokens
        new_result = dict(result)
        if tokens <= limit:
            charged = tokens
            self.state.tokens_total.inc(stage_metrics.tool_label(ctx.tool, self.tools), amount=tokens)
            meta_extra: dict[str, Any] = {"resultTokens": tokens, "truncated": False}
            if structured_json is not None:
                meta_extra["structuredTokens"] = structured_tokens
        else:
            meta_extra = {"resultTokens": tokens, "truncated": True, "keptTokens": limit}
            room = limit
            if structured_json is not None:
                # The structured result gets its share of the room, cut to keep its shape.
                share = limit * structured_tokens // tokens
                cut, cost = self._cut_structured(ctx, structured, structured_tokens, share)
                if cut is None:
                    new_result.pop("structuredContent", None)
                    meta_extra["structuredContent"] = "omitted"
                else:
                    new_result["structuredContent"] = cut
                    meta_extra["structuredContent"] = "truncated"
                    room -= cost
                meta_extra["structuredTokens"] = structured_tokens
            kept = await self._truncate(ctx, items, tokens, limit, room, structured_json)
            new_result["content"] = kept
            if structured_json is None and _is_map(structured) and len(structured) == 1:
                # The SDKs wrap a plain return value as {"result": text}: it repeats the content, so it
                # is cut the same way (dropping it would break clients that check the output schema).
                (name, value), = structured.items()
                new_result["structuredContent"] = {name: kept[0].get("text", "")}
            charged = limit
            self.state.truncations += 1
            self.state.tokens_total.inc(stage_metrics.tool_label(ctx.tool, self.tools), amount=limit)
            self.state.truncations_total.inc(stage_metrics.tool_label(ctx.tool, self.tools))
        record = ctx.record
        if record is not None:
            record.result_tokens = limit if meta_extra["truncated"] else tokens
            record.truncated = meta_extra["truncated"]
        old_meta = new_result.get("_meta")
        meta = dict(old_meta) if _is_map(old_meta) else {}
        meta[META_KEY] = self._meta(await self._charge(key, used, charged), **meta_extra)
        new_result["_meta"] = meta
        # Built directly rather than with dataclasses.replace: this runs on every tool call.
        return Outcome(message={**message, "result": new_result}, raw=None, status=outcome.status,
                       headers=outcome.headers, event_id=outcome.event_id, streamed=outcome.streamed)

    def _cut_structured(self, ctx: CallContext, structured: Any, tokens: int, room: int) -> tuple[Any, int]:
        """`structured` cut to at most `room` tokens of JSON, still matching the tool's output schema; (None, 0) if none does."""
        if room <= 0:
            return None, 0
        ratio = room / tokens
        for _ in range(_CUT_ATTEMPTS):
            cut = _shrink(structured, ratio)
            cost = self.tokenizer.count(orjson.dumps(cut).decode())
            if cost <= room:
                return (cut, cost) if self._matches_schema(ctx.tool, cut) else (None, 0)
            ratio *= max(room / cost * 0.9, 0.1)
        return None, 0

    def _matches_schema(self, tool: str | None, value: Any) -> bool:
        """Whether `value` matches the output schema the upstream listed for `tool` (True when none is known)."""
        if self.tools is None or tool is None or tool not in self.tools:
            return True
        schema = self.tools.get(tool).definition.get("outputSchema")
        if not _is_map(schema):
            return True
        try:
            from jsonschema import validators  # only on this rare path: a cut structured result

            return validators.validator_for(schema)(schema).is_valid(value)
        except Exception:  # noqa: BLE001 - a schema nobody can check is no reason to drop the result
            return True

    def _count(self, items: list[Any]) -> int:
        total = 0
        for item in items:
            text = _text_of(item)
            total += self.tokenizer.count(text) if text is not None else NON_TEXT_TOKENS
        return total

    async def _truncate(self, ctx: CallContext, items: list[Any], tokens: int, limit: int, room: int,
                  structured_json: str | None = None) -> list[dict[str, Any]]:
        """The content cut to `room` tokens with the notice; the full text (and structured JSON) is stored for paging."""
        full = "\n\n".join(text for text in map(_text_of, items) if text)
        if structured_json is not None:
            full = f"{full}\n\n{structured_json}" if full else structured_json
        pages = self.tokenizer.pages(full, self.page_tokens)
        uri = await self._put_result(owner_of(ctx), pages, tokens)
        notice = TRUNCATED.format(total=tokens, kept=limit, uri=uri, pages=len(pages))
        room = max(room - self.tokenizer.count(notice), 0)
        kept: list[dict[str, Any]] = []
        for item in items:
            if room <= 0:
                break
            text = _text_of(item)
            if text is None:
                continue  # binary content does not survive a cut: it is in nobody's stored text either
            cost = self.tokenizer.count(text)
            if cost <= room and item.get("type") == "text":
                kept.append({**item, "text": text})
                room -= cost
            else:
                kept.append({"type": "text", "text": self.tokenizer.head(text, room)})
                room = 0
        if kept:
            kept[-1] = {**kept[-1], "text": kept[-1]["text"] + notice}
        else:
            kept.append({"type": "text", "text": notice.lstrip()})
        kept.append({"type": "resource_link", "uri": uri, "name": "full-result",
                     "description": f"The full result: {tokens} tokens in {len(pages)} pages", "mimeType": "text/plain"})
        return kept

    async def _put_result(self, owner: str, pages: list[str], tokens: int) -> str:
        """Store a truncated result's pages for `owner`; its URI. Without the store, this process keeps them (the
        link then works on this replica only)."""
        result_id = new_result_id()
        try:
            await self.conversations.put_result(result_id, owner, pages, tokens, RESULT_TTL_SECONDS)
        except StoreUnavailable as exc:
            self.state.store_errors.inc()
            log.warning("a truncated result is kept in this process only: the conversation store did not answer (%s)",
                        exc)
            await self.state.local.put_result(result_id, owner, pages, tokens, RESULT_TTL_SECONDS)
        return result_uri(result_id)

    async def _page(self, uri: str, owner: str) -> Page:
        result_id, number = parse_uri(uri)
        try:
            stored = await self.conversations.read_result(result_id, owner, number)
        except StoreUnavailable as exc:
            store_failed(self.policy.onStoreError, "the budget", "budget's", exc, self.state.store_errors)
            stored = None
        if stored is None and self.shared:  # kept here while the store was down
            stored = await self.state.local.read_result(result_id, owner, number)
        if stored is None:
            raise ResultNotFound(uri)
        return Page(uri=page_uri(uri, number), text=stored.text, number=number, count=stored.count,
                    tokens=stored.tokens)

    async def _read_stored(self, ctx: CallContext, uri: str) -> Outcome:
        try:
            page = await self._page(uri, owner_of(ctx))
        except ResultNotFound:
            raise UnknownResult(f"Resource not found: {uri}", data={"uri": uri}) from None
        key = budget_key(ctx)
        used = await self._used(key)
        cost = self.tokenizer.count(page.text)
        available = self.capacity - used
        if available < self.policy.minAvailable or cost > available:
            self.state.exhausted += 1
            raise BudgetExhausted(
                f"[BUDGET EXHAUSTED: page {page.number} of {uri} needs {cost} tokens, {max(available, 0)} are left.]",
                data={"uri": uri, "pageTokens": cost, META_KEY: self._meta(used, exhausted=True)})
        used = await self._charge(key, used, cost)
        page_meta: dict[str, Any] = {"page": page.number, "pages": page.count, "tokens": page.tokens}
        if page.next_uri:
            page_meta["next"] = page.next_uri
        contents = [{"uri": page.uri, "mimeType": "text/plain", "text": page.text,
                     "_meta": {"io.toolmesh/page": page_meta}}]
        result = {"contents": contents, "_meta": {META_KEY: self._meta(used, resultTokens=cost, truncated=False)},
                  **_era_fields(ctx, cacheable=True)}
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": result})


def _is_map(value: Any) -> bool:
    # The exact-type test first: parsed JSON is always a dict, and the ABC check costs far more.
    return type(value) is dict or isinstance(value, Mapping)


def _era_fields(ctx: CallContext, *, cacheable: bool = False) -> dict[str, Any]:
    """Fields the 2026-07-28 revision requires on every result the sidecar writes itself."""
    version = ctx.protocol_version
    if version is None or version < STATELESS_ERA:
        return {}
    fields: dict[str, Any] = {"resultType": "complete"}
    if cacheable:
        # A stored result is one subject's: clients may keep it, shared caches may not.
        fields.update(ttlMs=0, cacheScope="private")
    return fields


def _repeats_text(structured: Any, items: list[Any]) -> bool:
    """True for the SDKs' wrapping of a plain return value, {"result": text}, whose text is the content's."""
    if not _is_map(structured) or len(structured) != 1 or len(items) != 1:
        return False
    (value,) = structured.values()
    return isinstance(value, str) and value == _text_of(items[0])


def _shrink(value: Any, ratio: float) -> Any:
    """`value` with every array cut to its first `ratio` share of items (at least one) and long strings shortened."""
    kind = type(value)
    if kind is list:
        keep = min(len(value), max(1, int(len(value) * ratio)))
        return [_shrink(item, ratio) for item in value[:keep]]
    if kind is dict:
        return {name: _shrink(item, ratio) for name, item in value.items()}
    if kind is str and len(value) > _SHORT_STRING:
        return value[:max(_SHORT_STRING, int(len(value) * ratio))]
    return value


def _text_of(item: Any) -> str | None:
    """The text a model reads from one content item, None for binary content."""
    if not _is_map(item):
        return None
    kind = item.get("type")
    if kind == "text":
        text = item.get("text")
        return text if isinstance(text, str) else ""
    if kind == "resource":
        resource = item.get("resource")
        if isinstance(resource, Mapping) and isinstance(resource.get("text"), str):
            return resource["text"]
        return None
    if kind == "resource_link":
        return f"{item.get('name', '')} {item.get('uri', '')}"
    return None


def build(policy: MCPToolPolicySpec, shared: SharedState) -> BudgetStage | None:
    """The budget stage when the policy has a `budget` section."""
    section = policy.budget
    if section is None:
        return None
    state = shared.kept(BUDGET, lambda: BudgetState(shared=shared))
    state.local.max_keys = section.maxSessions
    tokenizer = Tokenizer(section.encoding)
    # An unknown encoding is refused here, with the policy. The vocabulary loads now at start-up
    # and in the background on a reload while serving; calls wait for it either way.
    tokenizer.preload()
    return BudgetStage(section, state, tokenizer, tools=shared.tools, conversations=shared.conversations)
