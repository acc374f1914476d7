"""The MCPToolPolicy custom resource: who may call which tool, and how calls are limited, cached, retried and budgeted.

Every section is optional: a section left out (None) switches its stage off.
Rules that name tools take fnmatch globs (`query_*`, `*`) and the first rule
that matches a name wins, so specific rules go before broad ones. Resource
rules take path globs (`*` within one segment, `**` across segments) matched
against the normalised URI (`normalise_resource_uri`).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import unquote_to_bytes

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from toolmesh.api.server import API_VERSION, SpecModel

KIND = "MCPToolPolicy"

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
Algorithm = Literal[
    "HS256", "HS384", "HS512",
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
]  # fmt: skip


# ---------------------------------------------------------------------------
# Errors and loading


class PolicyError(ValueError):
    """A policy document is invalid; the message names the source and every bad field."""

    def __init__(self, message: str, *, source: str | None = None, fields: Sequence[str] = ()):
        super().__init__(f"{source}: {message}" if source else message)
        self.source = source
        self.fields = tuple(fields)


def _field_path(loc: Iterable[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(document)"


def describe_validation_error(exc: ValidationError, prefix: str = "") -> tuple[str, list[str]]:
    """One line per problem, each starting with the dotted path of the field (`spec.auth.issuers[0].jwksUrl`)."""
    lines, fields = [], []
    for err in exc.errors(include_url=False):
        loc = [part for part in err["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
        path = _field_path([*([prefix] if prefix else []), *loc])
        msg = err["msg"].removeprefix("Value error, ")
        fields.append(path)
        lines.append(f"{path}: {msg}")
    return "; ".join(lines), fields


# ---------------------------------------------------------------------------
# Shared rule shapes


RuleT = TypeVar("RuleT")


def glob_matches(patterns: Iterable[str], name: str) -> bool:
    """True when `name` matches one of the fnmatch `patterns` (case-sensitive, as tool names are)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def match_rule(rules: Sequence[RuleT], name: str, attr: str = "tools") -> RuleT | None:
    """The first rule whose glob list `attr` matches `name`, or None."""
    for rule in rules:
        if glob_matches(getattr(rule, attr), name):
            return rule
    return None


def match_tool_rule(rules: Sequence[RuleT], tool_name: str) -> RuleT | None:
    """The first rule whose `tools` globs match `tool_name` (first match wins), or None."""
    return match_rule(rules, tool_name, "tools")


def _non_empty_globs(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("must list at least one name or glob")
    if any(not pattern for pattern in value):
        raise ValueError("globs must not be empty strings")
    return value


def _check_scopes(value: list[str]) -> list[str]:
    for scope in value:
        if not scope or any(ch.isspace() for ch in scope):
            raise ValueError(f"scope {scope!r} must be non-empty and contain no whitespace")
    return value


GlobList = Annotated[list[str], AfterValidator(_non_empty_globs)]
"""At least one name or fnmatch glob."""
ScopeList = Annotated[list[str], AfterValidator(_check_scopes)]
"""OAuth scope names (no whitespace)."""


# ---------------------------------------------------------------------------
# Resource URIs: the one form resource rules see, and what is refused rather than guessed at


class AmbiguousUri(ValueError):
    """A resource URI a server might resolve to another resource than the rules see: refused, never guessed at."""


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_HEX = frozenset("0123456789abcdefABCDEF")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_DEFAULT_PORTS = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}


def normalise_resource_uri(uri: str) -> str:
    """The form resource rules match (RFC 3986 §6.2.2), or AmbiguousUri.

    Normalised: scheme and host lowercased, a default port dropped, escapes of unreserved
    characters decoded (`%2e` → `.`), the hex of other escapes uppercased, and `file:/x` and
    `file://localhost/x` written `file:///x` (RFC 8089). Refused: control characters (raw or
    escaped), backslashes, escaped `/` or `\\`, escapes that are malformed, double-encoded or
    not UTF-8, escapes in the authority, empty path segments (`//`), and `.` or `..` segments
    anywhere after the authority (also as `..;x`): a server could resolve those to another
    resource than the rules see, so they are refused rather than removed (RFC 3986 §5.2.4).
    """
    if not uri.isprintable() or "\\" in uri:
        raise AmbiguousUri("control characters or backslashes in the URI")
    match = _SCHEME.match(uri)
    if match is None:
        scheme, rest = "", uri
    else:
        scheme, rest = uri[: match.end() - 1].lower(), uri[match.end():]
    authority: str | None = None
    if rest.startswith("//"):
        end = len(rest)
        for delimiter in "/?#":
            found = rest.find(delimiter, 2)
            if found != -1 and found < end:
                end = found
        authority, rest = rest[2:end], rest[end:]
        if "%" in authority:
            raise AmbiguousUri("percent-encoding in the authority")
        userinfo, at, host = authority.rpartition("@")
        host = host.lower()
        port = _DEFAULT_PORTS.get(scheme)
        if port and host.endswith(port):
            host = host[: -len(port)]
        authority = userinfo + at + host
    if scheme == "file" and authority in (None, "localhost") and rest.startswith("/"):
        authority = ""
    if "%" in rest:
        rest = _normalise_escapes(rest)
    path_end = len(rest)
    for delimiter in "?#":
        found = rest.find(delimiter)
        if found != -1 and found < path_end:
            path_end = found
    if "//" in rest[:path_end]:
        raise AmbiguousUri("empty path segment ('//')")
    if "." in rest:
        for piece in rest.split("/"):
            if piece[:1] == "." and _segment(piece) in (".", ".."):
                raise AmbiguousUri("'.' or '..' path segment")
    head = f"{scheme}:" if scheme else ""
    return head + rest if authority is None else f"{head}//{authority}{rest}"


def _segment(piece: str) -> str:
    """A `/`-separated piece up to its query, fragment or `;` parameters (servers that ignore `;x` see `..`)."""
    for stop in "?#;":
        found = piece.find(stop)
        if found != -1:
            piece = piece[:found]
    return piece


def _normalise_escapes(text: str) -> str:
    parts = text.split("%")
    out = [parts[0]]
    high = False
    for part in parts[1:]:
        pair = part[:2]
        if len(pair) < 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise AmbiguousUri("'%' not followed by two hex digits")
        byte = int(pair, 16)
        char = chr(byte)
        if char in _UNRESERVED:
            out.append(char + part[2:])
            continue
        if byte < 0x20 or byte == 0x7F:
            raise AmbiguousUri("percent-encoded control character")
        if char == "/" or char == "\\":
            raise AmbiguousUri("percent-encoded '/' or '\\'")
        if byte == 0x25 and len(part) >= 4 and part[2] in _HEX and part[3] in _HEX:
            raise AmbiguousUri("double percent-encoding")
        high = high or byte >= 0x80
        out.append("%" + pair.upper() + part[2:])
    normal = "".join(out)
    if high:
        try:
            # Overlong forms (`%C0%AE` for `.`) are what lenient decoders turn into path syntax.
            unquote_to_bytes(normal).decode("utf-8")
        except UnicodeDecodeError:
            raise AmbiguousUri("percent-encoded bytes that are not UTF-8") from None
    return normal


@functools.lru_cache(maxsize=4096)
def resource_glob(pattern: str) -> re.Pattern[str]:
    """The compiled resource glob: `*` and `?` stay within one path segment, `**` crosses segments (`**/` also none)."""
    return re.compile(_translate(normalise_resource_uri(pattern)))


def _translate(pattern: str) -> str:
    out = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        i += 1
        if char == "*":
            if i < n and pattern[i] == "*":
                while i < n and pattern[i] == "*":
                    i += 1
                if i < n and pattern[i] == "/":
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
            else:
                out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            j = i + 1 if pattern[i:i + 1] == "!" else i
            j += 1 if pattern[j:j + 1] == "]" else 0
            j = pattern.find("]", j)
            if j == -1:
                out.append(re.escape(char))
                continue
            body, i = pattern[i:j], j + 1
            negate = body.startswith("!")
            body = body[1:] if negate else body
            body = "".join("\\" + c if c in "\\[^&~|" else c for c in body)
            out.append(f"(?!/)[{'^' if negate else ''}{body}]")
        else:
            out.append(re.escape(char))
    return "(?s:" + "".join(out) + r")\Z"


def _resource_globs(value: list[str]) -> list[str]:
    for pattern in value:
        try:
            resource_glob(pattern)
        except AmbiguousUri as exc:
            raise ValueError(f"resource glob {pattern!r} could never match: {exc}") from None
        except re.error as exc:
            raise ValueError(f"resource glob {pattern!r} is not a glob: {exc}") from None
    return value


ResourceGlobList = Annotated[list[str], AfterValidator(_non_empty_globs), AfterValidator(_resource_globs)]
"""At least one resource URI or path glob."""


class ToolMatch(SpecModel):
    """Base for per-tool rules: which tools the rule applies to."""

    tools: GlobList
    """Tool names or fnmatch globs (`query_*`, `*`); required, at least one."""


# ---------------------------------------------------------------------------
# auth


class SecretKeyRef(SpecModel):
    """One key of a Kubernetes Secret in the policy's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    """Name of the Secret (required)."""
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """Key in the Secret's data (required)."""


KEY_SOURCES = ("jwksUrl", "publicKey", "secret", "secretEnv", "secretFile", "secretRef")
"""The ways an issuer's key can be given; exactly one per issuer."""


class Issuer(SpecModel):
    """One trusted token issuer and how to verify its signatures. Exactly one key source must be set."""

    issuer: str = Field(min_length=1)
    """The `iss` claim tokens must carry (required)."""
    audiences: list[str] = Field(min_length=1)
    """Accepted `aud` values; a token must name at least one (required, at least one)."""
    algorithms: list[Algorithm] = Field(default_factory=list)
    """Signature algorithms accepted from this issuer. Default: ["HS256"] for secrets, ["RS256", "ES256"] for keys."""
    jwksUrl: str | None = None
    """URL of the issuer's JWKS document, fetched over HTTP, cached and re-fetched on an unknown `kid`. Default none."""
    publicKey: str | None = None
    """A PEM public key (RSA, EC or Ed25519) that verifies every token of this issuer. Default none."""
    secret: str | None = None
    """An HMAC shared secret, inline (outside tests prefer `secretRef` in a cluster, `secretFile`/`secretEnv` elsewhere). Default none."""
    secretEnv: str | None = None
    """Name of an environment variable of the sidecar holding the HMAC secret (a sidecar you run yourself; the operator sets no such variable: use `secretRef`). Default none."""
    secretFile: str | None = None
    """Path of a file holding the HMAC secret; trailing newline ignored. In a cluster use `secretRef`, which the operator turns into this. Default none."""
    secretRef: SecretKeyRef | None = None
    """The HMAC secret from a key of a Secret in the policy's namespace: the operator checks it exists, mounts it into the sidecar under `/var/run/secrets/toolmesh-policy/<name>/` and gives the sidecar that file as `secretFile`. Default none."""
    leewaySeconds: int = Field(default=30, ge=0, le=600)
    """Clock skew tolerated on `exp` and `nbf`, in seconds. Default 30."""
    jwksCacheSeconds: int = Field(default=300, ge=1)
    """How long a fetched JWKS is trusted before it is fetched again, in seconds. Default 300."""
    jwksMinRefreshSeconds: float = Field(default=10.0, ge=0)
    """Least time between two JWKS fetches caused by unknown `kid`s (stops a flood of bad tokens hammering the issuer). Default 10."""
    scopeClaim: str | None = Field(default=None, min_length=1)
    """The claim holding the caller's scopes, as a space-separated string (RFC 6749 §3.3: split on spaces only) or a list of strings, e.g. `scopes` or `permissions`; only that claim is read. Default: `scope`, then `scp` (both read)."""

    @field_validator("jwksUrl")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("publicKey")
    @classmethod
    def _check_pem(cls, value: str | None) -> str | None:
        if value is not None and "-----BEGIN" not in value:
            raise ValueError("must be a PEM public key (-----BEGIN PUBLIC KEY----- ...)")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> Issuer:
        sources = [name for name in KEY_SOURCES if getattr(self, name)]
        if len(sources) != 1:
            found = ", ".join(sources) or "none"
            raise ValueError(f"exactly one of {', '.join(KEY_SOURCES)} must be set (found: {found})")
        wrong = [alg for alg in self.algorithms if (alg in HMAC_ALGORITHMS) != self.is_hmac]
        if wrong:
            # Mixing families is what makes "HS256 signed with the RSA public key" attacks possible.
            kind = "an HMAC secret" if self.is_hmac else "a public key or JWKS"
            raise ValueError(f"algorithms {wrong} cannot be verified with {kind}")
        return self

    @property
    def is_hmac(self) -> bool:
        """True when this issuer signs with a shared secret."""
        return bool(self.secret or self.secretEnv or self.secretFile or self.secretRef)

    @property
    def allowed_algorithms(self) -> list[str]:
        """The algorithm allow-list in force (the configured one or the default for the key kind)."""
        if self.algorithms:
            return list(self.algorithms)
        return ["HS256"] if self.is_hmac else ["RS256", "ES256"]

    def resolve_secret(self) -> bytes | None:
        """The HMAC secret from `secret`, `secretEnv` or `secretFile`; raises PolicyError when it cannot be read."""
        if self.secret:
            return self.secret.encode()
        if self.secretEnv:
            value = os.environ.get(self.secretEnv)
            if not value:
                raise PolicyError(f"auth issuer {self.issuer!r}: environment variable {self.secretEnv} is not set")
            return value.encode()
        if self.secretFile:
            try:
                with open(self.secretFile, "rb") as fh:
                    return fh.read().rstrip(b"\r\n")
            except OSError as exc:
                raise PolicyError(f"auth issuer {self.issuer!r}: cannot read secretFile: {exc}") from exc
        if self.secretRef:
            # The operator turns a secretRef into the secretFile of the Secret it mounts; a sidecar never reads one.
            raise PolicyError(f"auth issuer {self.issuer!r}: secretRef {self.secretRef.name}/{self.secretRef.key}"
                              " names a Kubernetes Secret, which only the operator can mount: give the sidecar"
                              " secretFile or secretEnv")
        return None


class AuthPolicy(SpecModel):
    """Bearer-token authentication (JWT)."""

    issuers: list[Issuer] = Field(min_length=1)
    """Trusted issuers; a token is checked against the one whose `issuer` equals its `iss` (required, at least one)."""
    resource: str | None = None
    """This server's resource URL in the RFC 9728 metadata and the base of the `resource_metadata` URL in challenges. Default: derived from the request (`<scheme>://<host>/mcp`, see `trustForwardedHeaders`)."""
    trustForwardedHeaders: bool = False
    """Derive the resource URL from `X-Forwarded-Proto`/`X-Forwarded-Host` when `resource` is not set; only for a sidecar behind a proxy that sets them (a client could otherwise point the metadata elsewhere). Default false: `http://<Host>`."""
    required: bool = True
    """When true a request without a token gets 401; when false it runs as subject "anonymous" with no scopes. Default true."""
    scopesSupported: list[str] = Field(default_factory=list)
    """Scopes advertised in the protected-resource metadata. Default: every scope named in `authorization`."""
    tokenCacheSize: int = Field(default=10000, ge=0)
    """How many verified tokens are remembered (by hash, until they expire) so a call does not re-verify a signature. Default 10000."""

    @model_validator(mode="after")
    def _unique_issuers(self) -> AuthPolicy:
        names = [i.issuer for i in self.issuers]
        if len(set(names)) != len(names):
            raise ValueError("issuers must have distinct `issuer` values")
        return self

    def issuer(self, iss: str) -> Issuer | None:
        """The configured issuer with this `iss`, or None."""
        for item in self.issuers:
            if item.issuer == iss:
                return item
        return None


# ---------------------------------------------------------------------------
# authorization


class ToolScopeRule(ToolMatch):
    """Scopes a caller needs for the matching tools (any one of them suffices)."""

    scopes: ScopeList = Field(default_factory=list)
    """Any-of: the caller needs at least one. An empty list lets any authenticated caller in. Default []."""


class ResourceScopeRule(SpecModel):
    """Scopes a caller needs to use the matching resources (any one of them suffices).

    URIs are normalised before they are matched (scheme and host lowercased, `%2e` read as `.`,
    `file:/x` and `file://localhost/x` as `file:///x`), and a URI a server could resolve to another
    resource than the rules see is refused with a JSON-RPC INVALID_PARAMS error whatever the rules say:
    `.` or `..` segments (also encoded, or as `..;x`), empty segments (`//`), encoded `/` or `\\`,
    backslashes, control characters, double or malformed percent-encoding. The upstream still gets
    the URI exactly as the client sent it.
    """

    resources: ResourceGlobList
    """Resource URIs or path globs, matched against the normalised URI: `*` and `?` stay within one path segment (`file:///docs/*` is `file:///docs/a.md`, not `file:///docs/a/b.md`), `**` crosses segments (`file:///docs/**`, `file:///**/*.md`; `**/` also matches no segment), `[abc]` as in fnmatch. `**` alone matches every URI. Required, at least one."""
    scopes: ScopeList = Field(default_factory=list)
    """Any-of: the caller needs at least one. An empty list lets any authenticated caller in. Default []."""

    def matches(self, normal_uri: str) -> bool:
        """True when one of the globs matches `normal_uri` (a `normalise_resource_uri` result)."""
        return any(resource_glob(pattern).match(normal_uri) for pattern in self.resources)


class PromptScopeRule(SpecModel):
    """Scopes a caller needs to get the matching prompts (any one of them suffices)."""

    prompts: GlobList
    """Prompt names or fnmatch globs; required, at least one."""
    scopes: ScopeList = Field(default_factory=list)
    """Any-of: the caller needs at least one. An empty list lets any authenticated caller in. Default []."""


class AuthorizationPolicy(SpecModel):
    """Per-tool, per-resource and per-prompt required scopes. Needs `auth` to know the caller's scopes."""

    rules: list[ToolScopeRule] = Field(default_factory=list)
    """Tool rules, first match wins. Default []: every tool needs `defaultScopes`."""
    defaultScopes: ScopeList = Field(default_factory=lambda: ["mcp:admin"])
    """Scopes (any-of) for tools, resources and prompts no rule names. Default ["mcp:admin"]."""
    resourceRules: list[ResourceScopeRule] = Field(default_factory=list)
    """Rules for `resources/read`, `resources/subscribe`/`unsubscribe`, `completion/complete` on a resource (template) and `resources/list`/`resources/templates/list` filtering, by normalised URI; first match wins. Default []."""
    promptRules: list[PromptScopeRule] = Field(default_factory=list)
    """Rules for `prompts/get` and `completion/complete` on a prompt, by prompt name; first match wins. Default []."""
    filterLists: bool = True
    """Remove from `tools/list`, `resources/list` and `prompts/list` what the caller may not use. Default true."""

    def tool_scopes(self, tool: str) -> list[str]:
        """Scopes (any-of) needed to call `tool`."""
        rule = match_rule(self.rules, tool, "tools")
        return rule.scopes if rule is not None else self.defaultScopes

    def resource_scopes(self, uri: str) -> list[str]:
        """Scopes (any-of) needed to use the resource at `uri`, matched in its normal form; AmbiguousUri when it has none."""
        normal = normalise_resource_uri(uri)
        for rule in self.resourceRules:
            if rule.matches(normal):
                return rule.scopes
        return self.defaultScopes

    def prompt_scopes(self, prompt: str) -> list[str]:
        """Scopes (any-of) needed to get the prompt `prompt`."""
        rule = match_rule(self.promptRules, prompt, "prompts")
        return rule.scopes if rule is not None else self.defaultScopes

    def all_scopes(self) -> list[str]:
        """Every scope the policy names, in first-seen order (for `scopes_supported`)."""
        seen: dict[str, None] = {}
        for rules in (self.rules, self.resourceRules, self.promptRules):
            for rule in rules:
                seen.update(dict.fromkeys(rule.scopes))
        seen.update(dict.fromkeys(self.defaultScopes))
        return list(seen)


# ---------------------------------------------------------------------------
# rateLimit


class RateLimitRule(ToolMatch):
    """A separate bucket for the matching tools, per subject."""

    requestsPerSecond: float = Field(gt=0)
    """Sustained rate for these tools, per subject (required)."""
    burst: int | None = Field(default=None, ge=1)
    """Bucket size for these tools. Default: the section's `burst`."""


class RateLimitPolicy(SpecModel):
    """Token-bucket rate limits per subject (and optionally per tool).

    A limit counts calls: `tools/call`, `resources/read`, `prompts/get` and `completion/complete` (also when
    sent as notifications). Protocol set-up and chatter are never charged: `initialize`, `ping`, the
    `*/list` methods, subscriptions, `logging/setLevel` and other notifications.
    """

    requestsPerSecond: float = Field(default=10.0, gt=0)
    """Sustained calls per second per subject. Default 10."""
    burst: int = Field(default=20, ge=1)
    """Bucket size: calls a subject may make at once after being idle. Default 20."""
    perTool: bool = False
    """When true each subject has one bucket per tool instead of one for all tools. Default false."""
    tools: list[RateLimitRule] = Field(default_factory=list)
    """Per-tool overrides (own bucket per subject and tool), first match wins. Default []."""
    maxSubjects: int = Field(default=10000, ge=1, le=10_000_000)
    """Most buckets kept in memory; the least recently used is dropped beyond it. Default 10000."""
    onStoreError: Literal["allow", "deny"] = "allow"
    """With a shared store (`--state-redis-url`): what a call gets when the store does not answer. `allow` lets it through uncharged, `deny` refuses it with 503 and `Retry-After`; either way `toolmesh_rate_limit_store_errors_total` counts it and a log line says so. Default allow: a store outage must not become an outage of every server sharing it."""


# ---------------------------------------------------------------------------
# quota

QUOTA_WINDOWS = {"minute": 60, "hour": 3600, "day": 86400}
"""Seconds in each quota window; windows are aligned to the clock (a day starts at 00:00 UTC)."""


class QuotaRule(SpecModel):
    """A named allowance per subject per window: calls, or tokens of tool results, or both."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    """The quota's name, given back in the 429 that refuses a call (required; a DNS label)."""
    window: Literal["minute", "hour", "day"] = "day"
    """The period the allowance is for, aligned to the clock (a day starts at 00:00 UTC). Default day."""
    calls: int | None = Field(default=None, ge=1)
    """Charged calls a subject may make per window (`tools/call`, `resources/read`, `prompts/get`, `completion/complete`)."""
    resultTokens: int | None = Field(default=None, ge=1)
    """Tokens of tool results a subject may receive per window, as the budget counts them (needs a `budget` section). A call is refused once the tokens already received reach it; the call that crosses it completes."""
    tools: GlobList = Field(default_factory=lambda: ["*"])
    """The tools the quota counts (names or globs); resources, prompts and completions count under `*` only. Default ["*"]."""
    perTool: bool = False
    """When true each subject has one allowance per tool instead of one for all the tools matched. Default false."""

    @model_validator(mode="after")
    def _counts_something(self) -> QuotaRule:
        if self.calls is None and self.resultTokens is None:
            raise ValueError(f"quota {self.name!r} counts nothing: give calls, resultTokens or both")
        return self


class QuotaPolicy(SpecModel):
    """Allowances per subject per minute, hour or day, held across every replica when the sidecars share a store.

    Every rule applies: a call is refused with 429, `Retry-After` until its window resets and the quota's name in
    the error, when any quota it counts towards is used up.
    """

    rules: list[QuotaRule] = Field(min_length=1)
    """The quotas (required, at least one); names are unique."""
    onStoreError: Literal["allow", "deny"] = "deny"
    """With a shared store (`--state-redis-url`): what a call gets when the store does not answer. `deny` (the default) refuses it with 503 and `Retry-After`: a quota is an allowance someone pays for, and an outage must not hand out more; `allow` lets it through uncounted. Either way `toolmesh_quota_store_errors_total` counts it."""

    @model_validator(mode="after")
    def _unique_names(self) -> QuotaPolicy:
        names = [rule.name for rule in self.rules]
        if len(names) != len(set(names)):
            raise ValueError("quota names must be unique")
        return self


# ---------------------------------------------------------------------------
# cache


class CacheRule(ToolMatch):
    """Cache settings for the matching tools."""

    ttlSeconds: float | None = Field(default=None, ge=0)
    """Time to live for these tools' results; 0 disables caching them. Default: the section's `ttlSeconds`."""
    readOnly: bool | None = None
    """Treat these tools as read-only (cacheable) or not, whatever their annotations say. Default: the annotations."""
    shared: bool = False
    """Share cached results between subjects (the key leaves out the subject). Default false."""


class CachePolicy(SpecModel):
    """Result cache for read-only tools: LRU + TTL, bounded by entries and bytes."""

    enabled: bool = True
    """Cache results at all. Default true."""
    maxEntries: int = Field(default=1000, ge=1)
    """Most results kept. Default 1000."""
    maxBytes: int = Field(default=64 * 1024 * 1024, ge=1)
    """Most bytes of results kept (serialised size). Default 67108864 (64 MiB)."""
    ttlSeconds: float = Field(default=300, ge=0)
    """Time to live of a cached result, in seconds. Default 300."""
    tools: list[CacheRule] = Field(default_factory=list)
    """Per-tool rules, first match wins. Default []."""


# ---------------------------------------------------------------------------
# budget


class BudgetPolicy(SpecModel):
    """Context-window budget per conversation: one ledger, under the verified subject, for each `Mcp-Budget-Key`
    (the gateway sends one per gateway session, so every server and replica a conversation reaches charges the
    same ledger; a stateless caller names its own), else for each MCP session at the sidecar.

    The ledger is shared by the servers of a namespace and their replicas with `--state-redis-url`, by the local
    sidecars of `toolmesh up` through its state file, and kept in the process otherwise. A stateless call with
    neither header nor session is budgeted alone: a full window, no ledger kept. The text
    content and `structuredContent` (unless it only repeats the text) both count; a truncated result keeps
    a shape-preserving cut of `structuredContent` that still matches the tool's `outputSchema`, or leaves it
    out when none does, and links the full result.
    """

    totalTokens: int = Field(default=128000, ge=1)
    """The agent's context window, in tokens. Default 128000."""
    reservedForResponse: int = Field(default=4096, ge=0)
    """Tokens kept free for the model's answer. Default 4096."""
    reservedForSystem: int = Field(default=2000, ge=0)
    """Tokens kept free for the system prompt. Default 2000."""
    resultFraction: float = Field(default=0.3, gt=0, le=1)
    """Largest share of the tokens still available one result may take before it is truncated. Default 0.3."""
    minAvailable: int = Field(default=500, ge=0)
    """Below this many available tokens calls are answered with [BUDGET EXHAUSTED …] without reaching upstream. Default 500."""
    encoding: str = Field(default="o200k_base", min_length=1)
    """tiktoken encoding used to count tokens. Default "o200k_base"."""
    sessionTtlSeconds: float = Field(default=3600, gt=0)
    """A budget not charged for this long is forgotten (refused calls do not keep it alive). Default 3600."""
    maxSessions: int = Field(default=10000, ge=1)
    """Most ledgers kept in the process; the least recently used is dropped beyond it (a shared store expires them after `sessionTtlSeconds` instead). Default 10000."""
    onStoreError: Literal["allow", "deny"] = "allow"
    """With a shared store: what a call gets when the store does not answer. `allow` (the default) budgets it against what this process has seen of the conversation (a charge the store missed is kept in this process only, counted in `toolmesh_budget_store_errors_total` and logged): the budget protects the agent's own context, and an outage must not stop its work; `deny` refuses it with 503 and `Retry-After`."""

    @model_validator(mode="after")
    def _reserves_fit(self) -> BudgetPolicy:
        if self.reservedForResponse + self.reservedForSystem >= self.totalTokens:
            raise ValueError("reservedForResponse + reservedForSystem must be less than totalTokens")
        return self


# ---------------------------------------------------------------------------
# retry and circuit breaker


class RetryStrategy(str, Enum):
    """How the delay grows between attempts."""

    exponential = "exponential"
    linear = "linear"
    immediate = "immediate"


class Jitter(str, Enum):
    """How the delay is randomised."""

    equal = "equal"
    """Delay × a random factor in [0.5, 1.5) (±50 %)."""
    full = "full"
    """A random delay in [0, delay)."""
    none = "none"
    """The delay as computed."""


class RetryRule(ToolMatch):
    """Retry settings for the matching tools; unset fields take the section's value."""

    maxAttempts: int | None = Field(default=None, ge=1, le=20)
    """Attempts in all, the first included. Default: the section's."""
    strategy: RetryStrategy | None = None
    """Delay growth. Default: the section's."""
    baseDelayMs: int | None = Field(default=None, ge=0)
    """First delay in milliseconds. Default: the section's."""
    maxDelayMs: int | None = Field(default=None, ge=0)
    """Largest delay in milliseconds. Default: the section's."""
    jitter: Jitter | None = None
    """Delay randomisation. Default: the section's."""
    force: bool | None = None
    """Retry these tools even when they are neither idempotent nor read-only. Default: the section's."""


class RetryPolicy(SpecModel):
    """Retries of failed calls (transport failures, 502/503/504, timeouts, JSON-RPC internal errors)."""

    maxAttempts: int = Field(default=3, ge=1, le=20)
    """Attempts in all, the first included. Default 3."""
    strategy: RetryStrategy = RetryStrategy.exponential
    """Delay growth: exponential (base × 2^n), linear (base × (n+1)) or immediate. Default exponential."""
    baseDelayMs: int = Field(default=1000, ge=0)
    """First delay in milliseconds. Default 1000."""
    maxDelayMs: int = Field(default=30000, ge=0)
    """Largest delay in milliseconds (an upstream's Retry-After is honoured up to this). Default 30000."""
    jitter: Jitter = Jitter.equal
    """Delay randomisation: equal (±50 %), full (0..delay) or none. Default equal."""
    force: bool = False
    """Retry tools that are neither idempotent nor read-only too. Default false."""
    tools: list[RetryRule] = Field(default_factory=list)
    """Per-tool overrides, first match wins. Default []."""

    @model_validator(mode="after")
    def _delays_ordered(self) -> RetryPolicy:
        if self.maxDelayMs < self.baseDelayMs:
            raise ValueError("maxDelayMs must be at least baseDelayMs")
        return self


class CircuitBreakerPolicy(SpecModel):
    """Per-tool circuit breaker on the upstream."""

    failureThreshold: int = Field(default=5, ge=1)
    """Consecutive failures that open the breaker. Default 5."""
    openSeconds: float = Field(default=60, gt=0)
    """How long an open breaker refuses calls before a half-open trial. Default 60."""
    halfOpenMaxCalls: int = Field(default=1, ge=1)
    """Trial calls let through while half-open. Default 1."""


# ---------------------------------------------------------------------------
# timeouts, audit, tool metadata


class TimeoutPolicy(SpecModel):
    """How long a call may take; progress notifications extend it up to a hard maximum."""

    callSeconds: float = Field(default=60, gt=0)
    """Time a call may take without progress. Default 60."""
    progressExtensionSeconds: float = Field(default=30, ge=0)
    """Each progress notification gives the call this much more time from when it arrives. Default 30."""
    maxSeconds: float = Field(default=600, gt=0)
    """Hard maximum for a call, whatever its progress. Default 600."""

    @model_validator(mode="after")
    def _max_covers_call(self) -> TimeoutPolicy:
        if self.maxSeconds < self.callSeconds:
            raise ValueError("maxSeconds must be at least callSeconds")
        return self


class AuditPolicy(SpecModel):
    """Audit log of authorization decisions, one JSON line each; never contains a token."""

    enabled: bool = True
    """Write audit lines. Default true."""
    sink: str = Field(default="stderr", min_length=1)
    """"stderr", "stdout" or a file path (appended to). Default "stderr"."""


class ToolOverride(ToolMatch):
    """Metadata for the matching tools that replaces what the upstream's annotations say."""

    readOnly: bool | None = None
    """Treat as read-only (cacheable, retryable). Default: the annotation."""
    idempotent: bool | None = None
    """Treat as idempotent (retryable). Default: the annotation."""
    destructive: bool | None = None
    """Treat as destructive (never cached). Default: the annotation."""


# ---------------------------------------------------------------------------
# selector and the spec


class SelectorOperator(str, Enum):
    """Label selector operators (as in Kubernetes)."""

    In = "In"
    NotIn = "NotIn"
    Exists = "Exists"
    DoesNotExist = "DoesNotExist"


class SelectorRequirement(SpecModel):
    """One label requirement."""

    key: str = Field(min_length=1)
    """Label key."""
    operator: SelectorOperator
    """In, NotIn, Exists or DoesNotExist."""
    values: list[str] = Field(default_factory=list)
    """Values for In/NotIn; empty for Exists/DoesNotExist."""

    @model_validator(mode="after")
    def _values_fit_operator(self) -> SelectorRequirement:
        needs = self.operator in (SelectorOperator.In, SelectorOperator.NotIn)
        if needs and not self.values:
            raise ValueError(f"operator {self.operator.value} needs values")
        if not needs and self.values:
            raise ValueError(f"operator {self.operator.value} takes no values")
        return self


class LabelSelector(SpecModel):
    """Which MCPServers (by label) a policy applies to; empty selects every MCPServer in the namespace."""

    matchLabels: dict[str, str] = Field(default_factory=dict)
    """Labels that must all be present with these values. Default {}."""
    matchExpressions: list[SelectorRequirement] = Field(default_factory=list)
    """Requirements that must all hold. Default []."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when `labels` satisfy this selector."""
        for key, value in self.matchLabels.items():
            if labels.get(key) != value:
                return False
        for req in self.matchExpressions:
            present = req.key in labels
            op = req.operator
            if op is SelectorOperator.Exists and not present:
                return False
            if op is SelectorOperator.DoesNotExist and present:
                return False
            if op is SelectorOperator.In and (not present or labels[req.key] not in req.values):
                return False
            if op is SelectorOperator.NotIn and present and labels[req.key] in req.values:
                return False
        return True


class MCPToolPolicySpec(SpecModel):
    """What an MCPToolPolicy asks of the sidecars of the MCPServers it selects. A section left out is switched off."""

    selector: LabelSelector = Field(default_factory=LabelSelector)
    """MCPServers (by label, in the policy's namespace) this policy applies to. Default: all."""
    precedence: int = 0
    """When several policies select one server, the higher precedence wins per section; ties by name. Default 0."""
    auth: AuthPolicy | None = None
    """Bearer-token authentication. Default: off (every caller is "anonymous")."""
    authorization: AuthorizationPolicy | None = None
    """Required scopes per tool, resource and prompt. Default: off (every caller may call everything)."""
    rateLimit: RateLimitPolicy | None = None
    """Token-bucket rate limits. Default: off."""
    quota: QuotaPolicy | None = None
    """Calls and result tokens per subject per minute, hour or day. Default: off."""
    cache: CachePolicy | None = None
    """Result cache for read-only tools. Default: off."""
    budget: BudgetPolicy | None = None
    """Context-window budgets. Default: off."""
    retry: RetryPolicy | None = None
    """Retries of failed calls. Default: off."""
    circuitBreaker: CircuitBreakerPolicy | None = None
    """Per-tool circuit breaker. Default: off."""
    timeouts: TimeoutPolicy | None = None
    """Call timeouts extended by progress. Default: off (no timeout beyond the transport's)."""
    audit: AuditPolicy | None = None
    """Audit log of authorization decisions. Default: off."""
    tools: list[ToolOverride] = Field(default_factory=list)
    """Per-tool metadata overrides (readOnly, idempotent, destructive), first match wins. Default []."""

    @model_validator(mode="after")
    def _authorization_needs_auth(self) -> MCPToolPolicySpec:
        if self.authorization is not None and self.auth is None:
            raise ValueError("authorization needs auth: scopes come from verified tokens")
        return self

    @model_validator(mode="after")
    def _token_quotas_need_a_budget(self) -> MCPToolPolicySpec:
        if self.quota is not None and self.budget is None and any(r.resultTokens for r in self.quota.rules):
            raise ValueError("quota resultTokens needs budget: the budget counts the tokens of tool results")
        return self

    def tool_override(self, tool: str) -> ToolOverride | None:
        """The first `tools` override matching `tool`, or None."""
        return match_rule(self.tools, tool, "tools")


class ObjectMeta(SpecModel):
    """The part of Kubernetes object metadata a policy file may carry."""

    model_config = SpecModel.model_config | {"extra": "allow"}

    name: str | None = None
    """Object name."""
    namespace: str | None = None
    """Object namespace."""


class MCPToolPolicy(SpecModel):
    """A whole MCPToolPolicy manifest."""

    apiVersion: Literal["toolmesh.io/v1alpha1"] = API_VERSION
    """Always toolmesh.io/v1alpha1."""
    kind: Literal["MCPToolPolicy"] = KIND
    """Always MCPToolPolicy."""
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    """Object metadata (name, namespace, labels ...)."""
    spec: MCPToolPolicySpec = Field(default_factory=MCPToolPolicySpec)
    """The policy."""


class PolicyFile:
    """Reads a policy document: a whole MCPToolPolicy manifest or just its `spec`, as YAML or JSON."""

    @staticmethod
    def parse(data: Any, *, source: str | None = None) -> MCPToolPolicySpec:
        """The spec from parsed YAML/JSON data; raises PolicyError naming `source` and each bad field."""
        if data is None:
            return MCPToolPolicySpec()
        if not isinstance(data, Mapping):
            raise PolicyError(f"a policy must be a mapping, not {type(data).__name__}", source=source)
        is_manifest = "kind" in data or "apiVersion" in data
        try:
            if is_manifest:
                return MCPToolPolicy.model_validate(data).spec
            return MCPToolPolicySpec.model_validate(data)
        except ValidationError as exc:
            message, fields = describe_validation_error(exc)
            raise PolicyError(message, source=source, fields=fields) from None

    @classmethod
    def loads(cls, text: str | bytes, *, source: str | None = None) -> MCPToolPolicySpec:
        """The spec from YAML (or JSON) text."""
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PolicyError(f"not valid YAML: {exc}", source=source) from None
        return cls.parse(data, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MCPToolPolicySpec:
        """The spec from the file at `path`."""
        source = os.fspath(path)
        try:
            with open(path, "rb") as fh:
                text = fh.read()
        except OSError as exc:
            raise PolicyError(f"cannot read policy file: {exc.strerror or exc}", source=source) from None
        return cls.loads(text, source=source)
