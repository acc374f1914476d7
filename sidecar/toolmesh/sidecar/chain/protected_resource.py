"""OAuth protected-resource facts (RFC 9728 metadata, RFC 6750 `WWW-Authenticate` challenges) derived from the auth policy."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TYPE_CHECKING
from urllib.parse import urlsplit

from toolmesh.api.mcp_http import header

if TYPE_CHECKING:
    from toolmesh.api.policy import MCPToolPolicySpec

METADATA_PATH = "/.well-known/oauth-protected-resource"
MCP_PATH = "/mcp"

# What a challenge may carry of a value: printable ASCII (no control characters, which would break the
# header, and no non-ASCII, which HTTP cannot carry unencoded).
_UNQUOTABLE = re.compile(r"[^\x20-\x7e]")
# A host[:port] as the URL of the metadata may name it: reg-name or IP literal, nothing that changes the URL's shape.
_HOST = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def base_url(auth: Any, headers: Mapping[str, str]) -> str:
    """scheme://host[:port] clients reach this server at: `auth.resource` when set, else from the request.

    `X-Forwarded-Proto`/`X-Forwarded-Host` count only when `auth.trustForwardedHeaders` says a proxy
    in front sets them; otherwise anyone could make the challenge send clients to their own metadata.
    """
    resource = getattr(auth, "resource", None)
    if resource:
        parts = urlsplit(resource)
        return f"{parts.scheme}://{parts.netloc}"
    proto, host = "http", None
    if getattr(auth, "trustForwardedHeaders", False):
        proto = (header(headers, "X-Forwarded-Proto") or "http").split(",")[0].strip().lower()
        host = header(headers, "X-Forwarded-Host")
    host = (host or header(headers, "Host") or "localhost").split(",")[0].strip()
    if proto not in ("http", "https"):
        proto = "http"
    if not _HOST.fullmatch(host):
        host = "localhost"
    return f"{proto}://{host}"


def resource_url(auth: Any, headers: Mapping[str, str]) -> str:
    """The protected resource's identifier: `auth.resource`, or this server's MCP endpoint URL."""
    return getattr(auth, "resource", None) or base_url(auth, headers) + MCP_PATH


def metadata_url(auth: Any, headers: Mapping[str, str]) -> str:
    """Where the RFC 9728 document is served."""
    return base_url(auth, headers) + METADATA_PATH


def _quoted(value: str) -> str:
    """An RFC 9110 quoted-string: `\\` and `"` escaped, every character outside printable ASCII left out."""
    value = _UNQUOTABLE.sub("", value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge(
    auth: Any,
    headers: Mapping[str, str],
    *,
    error: str | None = None,
    description: str | None = None,
    scope: str | None = None,
) -> str:
    """A `WWW-Authenticate: Bearer …` value pointing at the metadata document, with an RFC 6750 error when one applies."""
    params = [f"resource_metadata={_quoted(metadata_url(auth, headers))}"]
    if error:
        params.append(f"error={_quoted(error)}")
    if description:
        params.append(f"error_description={_quoted(description)}")
    if scope:
        params.append(f"scope={_quoted(scope)}")
    return "Bearer " + ", ".join(params)


def metadata_document(policy: MCPToolPolicySpec | None, headers: Mapping[str, str]) -> dict[str, Any] | None:
    """The RFC 9728 protected-resource metadata, or None when the policy has no auth."""
    auth = policy.auth if policy is not None else None
    if auth is None:
        return None
    scopes = list(auth.scopesSupported)
    authorization = policy.authorization if policy is not None else None
    if not scopes and authorization is not None:
        scopes = authorization.all_scopes()
    return {
        "resource": resource_url(auth, headers),
        "authorization_servers": [issuer.issuer for issuer in auth.issuers],
        "scopes_supported": scopes,
        "bearer_methods_supported": ["header"],
    }
