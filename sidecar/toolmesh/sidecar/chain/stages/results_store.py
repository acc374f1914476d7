"""Full texts of truncated results, readable page by page at `toolmesh://results/<id>` by the subject they belong to.

Bounded by entries and bytes (least recently stored dropped first) and expiring,
so a flood of large results cannot grow the sidecar. Ids are random and
unguessable, and an id only resolves for its owner: another subject gets the
same answer as for an id that never existed.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

SCHEME = "toolmesh"
PREFIX = "toolmesh://results/"

DEFAULT_MAX_ENTRIES = 1000
"""Most stored results."""
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Most bytes of stored text (UTF-8)."""
DEFAULT_TTL_SECONDS = 3600.0
"""How long a stored result stays readable."""
DEFAULT_PAGE_TOKENS = 2000
"""Tokens per page when a stored result is read back."""


class ResultNotFound(LookupError):
    """No such result for this subject (never existed, expired, evicted or someone else's)."""


@dataclass(slots=True)
class StoredResult:
    """One full text, cut into pages at token boundaries."""

    owner: str
    pages: list[str]
    tokens: int
    size: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a stored result as `resources/read` returns it."""

    uri: str
    text: str
    number: int
    """1-based page number."""
    count: int
    """Pages in all."""
    tokens: int
    """Tokens in the whole stored result."""

    @property
    def next_uri(self) -> str | None:
        return page_uri(self.uri, self.number + 1) if self.number < self.count else None


def result_uri(result_id: str) -> str:
    return PREFIX + result_id


def page_uri(uri: str, number: int) -> str:
    base = uri.split("?", 1)[0]
    return base if number == 1 else f"{base}?page={number}"


def parse_uri(uri: str) -> tuple[str, int]:
    """(result id, page number) of a `toolmesh://results/<id>[?page=N]` URI; ResultNotFound when malformed."""
    parts = urlsplit(uri)
    if parts.scheme != SCHEME or parts.netloc != "results":
        raise ResultNotFound(uri)
    result_id = parts.path.lstrip("/")
    if not result_id or "/" in result_id:
        raise ResultNotFound(uri)
    page = 1
    values = parse_qs(parts.query).get("page")
    if values:
        try:
            page = int(values[0])
        except ValueError:
            raise ResultNotFound(uri) from None
    return result_id, page


class ResultsStore:
    """Stored full results keyed by random id, each readable only by its owner."""

    def __init__(self, *, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES,
                 ttl: float = DEFAULT_TTL_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.clock = clock
        self._results: OrderedDict[str, StoredResult] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._results)

    def put(self, owner: str, pages: list[str], tokens: int) -> str:
        """Store a result's pages for `owner`; returns its URI. Old entries give way to stay within the bounds."""
        self._expire()
        size = sum(len(p.encode()) for p in pages)
        result_id = secrets.token_urlsafe(18)
        self._results[result_id] = StoredResult(owner, pages, tokens, size, self.clock() + self.ttl)
        self.bytes += size
        while self._results and (len(self._results) > self.max_entries or self.bytes > self.max_bytes):
            _, dropped = self._results.popitem(last=False)
            self.bytes -= dropped.size
        return result_uri(result_id)

    def read(self, uri: str, owner: str) -> Page:
        """One page of a stored result; ResultNotFound unless `owner` stored it and it is still there."""
        result_id, number = parse_uri(uri)
        stored = self._results.get(result_id)
        if stored is None or stored.expires_at <= self.clock():
            if stored is not None:
                self._drop(result_id)
            raise ResultNotFound(uri)
        if not secrets.compare_digest(stored.owner.encode(), owner.encode()):
            raise ResultNotFound(uri)
        if not 1 <= number <= len(stored.pages):
            raise ResultNotFound(uri)
        return Page(uri=page_uri(uri, number), text=stored.pages[number - 1], number=number,
                    count=len(stored.pages), tokens=stored.tokens)

    def _drop(self, result_id: str) -> None:
        stored = self._results.pop(result_id)
        self.bytes -= stored.size

    def _expire(self) -> None:
        # Entries are in insertion order and share one ttl, so the expired ones are at the front.
        now = self.clock()
        while self._results:
            result_id, stored = next(iter(self._results.items()))
            if stored.expires_at > now:
                break
            self._drop(result_id)
