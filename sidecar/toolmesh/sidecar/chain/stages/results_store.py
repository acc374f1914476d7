"""Links to the full texts of truncated results: `toolmesh://results/<id>[?page=N]`, readable by their owner only.

The pages live in the conversation store (`toolmesh.sidecar.store`): this process's memory, bounded by entries
and bytes, or the store every server and replica shares. Ids are random and unguessable, and an id only
resolves for its owner: another subject gets the same answer as for an id that never existed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

SCHEME = "toolmesh"
PREFIX = "toolmesh://results/"

RESULT_TTL_SECONDS = 3600.0
"""How long a stored result stays readable."""
DEFAULT_PAGE_TOKENS = 2000
"""Tokens per page when a stored result is read back."""


class ResultNotFound(LookupError):
    """No such result for this subject (never existed, expired, evicted or someone else's)."""


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


def new_result_id() -> str:
    return secrets.token_urlsafe(18)


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
