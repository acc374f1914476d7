"""The gateway's face as an OAuth protected resource: RFC 9728 metadata composed from its servers', and RFC 6750
challenges that point at it.

The gateway verifies no token (its sidecars do, on every call); it only tells a
client where to sign in. Its metadata names the gateway itself as the resource
and, as its authorization servers and scopes, the union of what the healthy
servers behind it announce in their heartbeats (each sidecar's own RFC 9728
metadata). A sidecar's 401/403 for a call reaches the caller with that status
and a challenge naming the gateway's metadata, keeping the sidecar's `error`,
`error_description` and `scope`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

METADATA_PATH = "/.well-known/oauth-protected-resource"
MAX_ITEMS = 64
"""Authorization servers and scopes kept from one heartbeat (a sidecar has a handful)."""
MAX_LENGTH = 2048

_UNQUOTABLE = re.compile(r"[^\x20-\x7e]")
_HOST = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
KEPT_PARAMS = ("error", "error_description", "scope")
"""What of a sidecar's challenge the gateway's own keeps (never its `resource_metadata`, which names the sidecar)."""


@dataclass(frozen=True, slots=True)
class CallerAuth:
    """How a sidecar authenticates its callers, as its heartbeat says (from its RFC 9728 metadata)."""

    required: bool
    """A request without a token gets 401 there."""
    authorization_servers: tuple[str, ...] = ()
    """The issuers it trusts (`authorization_servers` of its metadata)."""
    scopes_supported: tuple[str, ...] = ()

    @classmethod
    def from_beat(cls, value: Any) -> CallerAuth | None:
        """The `auth` object of a heartbeat; None when absent. Raises ValueError when malformed."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError("'auth' must be an object")
        return cls(required=value.get("required") is not False,
                   authorization_servers=_strings(value.get("authorizationServers"), "authorizationServers"),
                   scopes_supported=_strings(value.get("scopesSupported"), "scopesSupported"))


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and 0 < len(v) <= MAX_LENGTH for v in value):
        raise ValueError(f"'auth.{name}' must be a list of non-empty strings")
    return tuple(dict.fromkeys(value))[:MAX_ITEMS]


def resource_url(public_url: str | None, scheme: str, host: str | None, path: str = "/mcp") -> str:
    """The gateway's resource identifier: `--public-url`, else its MCP URL as this request reached it."""
    if public_url:
        return public_url
    host = (host or "").strip()
    if not _HOST.fullmatch(host):
        host = "localhost"
    return f"{scheme if scheme in ('http', 'https') else 'http'}://{host}{path}"


def metadata_url(resource: str) -> str:
    """Where the metadata of `resource` is served (RFC 9728 §3.1: the well-known path, then the resource's path)."""
    parts = urlsplit(resource)
    return f"{parts.scheme}://{parts.netloc}{METADATA_PATH}{parts.path.rstrip('/')}"


def metadata_document(resource: str, auths: Iterable[CallerAuth]) -> dict[str, Any]:
    """RFC 9728 metadata for the gateway: the union of its servers' authorization servers and scopes."""
    servers: dict[str, None] = {}
    scopes: dict[str, None] = {}
    for auth in auths:
        servers.update(dict.fromkeys(auth.authorization_servers))
        scopes.update(dict.fromkeys(auth.scopes_supported))
    return {"resource": resource, "authorization_servers": list(servers), "scopes_supported": sorted(scopes),
            "bearer_methods_supported": ["header"], "resource_name": "toolmesh gateway"}


def challenge_params(header: str | None) -> dict[str, str]:
    """The parameters of a `WWW-Authenticate: Bearer …` value the gateway keeps (see `KEPT_PARAMS`)."""
    if not header or header[:6].lower() != "bearer":
        return {}
    found: dict[str, str] = {}
    for name, quoted, token in _PARAM.findall(header[6:]):
        if name in KEPT_PARAMS and name not in found:
            found[name] = re.sub(r"\\(.)", r"\1", quoted) if quoted else token
    return found


def challenge(resource: str, params: Mapping[str, str] | None = None) -> str:
    """A `WWW-Authenticate` value pointing at the gateway's metadata, with the given RFC 6750 parameters."""
    parts = [f"resource_metadata={_quoted(metadata_url(resource))}"]
    parts.extend(f"{name}={_quoted(value)}" for name, value in (params or {}).items() if name in KEPT_PARAMS)
    return "Bearer " + ", ".join(parts)


def _quoted(value: str) -> str:
    value = _UNQUOTABLE.sub("", value)[:MAX_LENGTH]
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
