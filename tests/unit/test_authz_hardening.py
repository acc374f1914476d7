"""The authorization fixes stage by stage: scope splitting and claims on real tokens, challenges built from hostile
input, forwarded headers only when trusted, and notifications, completions and toolmesh:// URIs judged by the stage."""

from __future__ import annotations

import json

import jwt
import pytest
from helpers.tokens import TokenIssuer
from multidict import CIMultiDict

from toolmesh.api.jsonrpc import FORBIDDEN, INVALID_PARAMS
from toolmesh.api.policy import PolicyError, PolicyFile
from toolmesh.sidecar.chain.frame import NOTIFICATION, CallContext, Caller, Outcome, derive, run_chain
from toolmesh.sidecar.chain.stages.jwt_verify import scopes_of
from toolmesh.sidecar.chain.protected_resource import challenge, metadata_document
from toolmesh.sidecar.chain.stages import authenticate, authorize
from toolmesh.sidecar.chain.state import SharedState


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer()


def policy_for(issuer: TokenIssuer, issuer_extra: dict | None = None, auth_extra: dict | None = None, **sections):
    issuers = [{"issuer": issuer.issuer, "audiences": [issuer.audience], "publicKey": issuer.public_pem("rsa"),
                **(issuer_extra or {})}]
    return PolicyFile.parse({"auth": {"issuers": issuers, **(auth_extra or {})}, **sections})


def context(method: str = "tools/call", params=None, token: str | None = None, **headers) -> CallContext:
    h = CIMultiDict({"Host": "127.0.0.1:7400", **headers})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    return CallContext(method=method, request_id=7, params=params or {}, raw=b"", headers=h)


class Terminal:
    def __init__(self) -> None:
        self.seen: list[CallContext] = []

    async def __call__(self, ctx: CallContext) -> Outcome:
        self.seen.append(ctx)
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": {}})


async def caller_of(issuer: TokenIssuer, policy, token: str) -> Caller:
    stage = authenticate.build(policy, SharedState("s"))
    terminal = Terminal()
    outcome = await run_chain(lambda c: stage(c, terminal), context(token=token))
    assert outcome.status == 200, outcome.message
    return terminal.seen[0].caller


# --- B: scopes split on the space character only ---------------------------------------------------


@pytest.mark.parametrize("separator", ["\u00a0", "\t", "\n", "\u2003", "\u3000", "\x1c", "\u2028"])
async def test_only_a_space_separates_scopes(issuer, separator):
    caller = await caller_of(issuer, policy_for(issuer), issuer.token("alice", f"public{separator}mcp:admin"))
    assert caller.scopes == frozenset()
    caller = await caller_of(issuer, policy_for(issuer), issuer.token("alice", "public  mcp:admin"))
    assert caller.scopes == {"public", "mcp:admin"}


def test_list_items_with_other_whitespace_are_dropped_whole():
    assert scopes_of({"scp": ["a\u00a0b", "c d", "e"]}) == {"e"}
    assert scopes_of({"scope": "a\u00a0b c"}) == {"c"}


# --- C: scopeClaim -----------------------------------------------------------------------------------


def signed(issuer: TokenIssuer, **claims) -> str:
    body = {k: v for k, v in {**issuer.claims("alice"), **claims}.items() if v is not None}
    return jwt.encode(body, issuer.rsa_key, algorithm="RS256", headers={"kid": issuer.rsa_kid})


async def test_scope_claim_reads_only_the_named_claim(issuer):
    policy = policy_for(issuer, {"scopeClaim": "scopes"})
    assert (await caller_of(issuer, policy, signed(issuer, scopes=["a", "b"]))).scopes == {"a", "b"}
    assert (await caller_of(issuer, policy, signed(issuer, scopes="a b"))).scopes == {"a", "b"}
    assert (await caller_of(issuer, policy, signed(issuer, scope="a", scp=["b"]))).scopes == frozenset()
    default = policy_for(issuer)
    assert (await caller_of(issuer, default, signed(issuer, scope="a", scp=["b"], scopes=["c"]))).scopes == {"a", "b"}


def test_scope_claim_must_name_a_claim(issuer):
    with pytest.raises(PolicyError, match=r"auth\.issuers\[0\]\.scopeClaim"):
        policy_for(issuer, {"scopeClaim": ""})


# --- E: challenge values ----------------------------------------------------------------------------


def test_challenge_values_are_quoted_strings_of_printable_ascii(issuer):
    auth = policy_for(issuer).auth
    value = challenge(auth, {"Host": "127.0.0.1:7400"}, error="insufficient_scope",
                      description='a "b" \\ c\r\nX-Evil: 1\x00 caf\u00e9', scope="s")
    assert value.isascii() and value.isprintable()
    assert 'error_description="a \\"b\\" \\\\ cX-Evil: 1 caf"' in value


async def test_a_denied_challenge_never_repeats_the_callers_name(issuer):
    policy = policy_for(issuer, authorization={"rules": [{"tools": ["public"], "scopes": []}]})
    stage = authorize.build(policy, SharedState("s"))
    ctx = derive(context(params={"name": "secret_tool\r\nX: \u00e9"}),
                 caller=Caller(subject="alice", scopes=frozenset({"x"}), issuer=issuer.issuer))
    outcome = await run_chain(lambda c: stage(c, Terminal()), ctx)
    assert outcome.status == 403
    header = outcome.headers["WWW-Authenticate"]
    assert "secret_tool" not in header and header.isascii() and header.isprintable()


# --- F: forwarded headers -----------------------------------------------------------------------------

FORGED = {"Host": "127.0.0.1:7400", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}


def test_forwarded_headers_count_only_when_trusted(issuer):
    untrusted = policy_for(issuer)
    assert metadata_document(untrusted, CIMultiDict(FORGED))["resource"] == "http://127.0.0.1:7400/mcp"
    assert 'resource_metadata="http://127.0.0.1:7400/' in challenge(untrusted.auth, CIMultiDict(FORGED))
    trusted = policy_for(issuer, auth_extra={"trustForwardedHeaders": True})
    assert metadata_document(trusted, CIMultiDict(FORGED))["resource"] == "https://evil.example/mcp"
    pinned = policy_for(issuer, auth_extra={"trustForwardedHeaders": True, "resource": "https://tools.example/mcp"})
    assert metadata_document(pinned, CIMultiDict(FORGED))["resource"] == "https://tools.example/mcp"
    assert 'resource_metadata="https://tools.example/' in challenge(pinned.auth, CIMultiDict(FORGED))


@pytest.mark.parametrize("host", ['evil.example/"x', "a@evil.example", "a b", "evil.example/path"])
def test_a_host_that_would_change_the_urls_shape_is_not_used(issuer, host):
    assert metadata_document(policy_for(issuer), {"Host": host})["resource"] == "http://localhost/mcp"


# --- D: notifications, completion, toolmesh:// --------------------------------------------------------

RULES = {
    "rules": [{"tools": ["public_*"], "scopes": []}],
    "resourceRules": [{"resources": ["file:///public/**"], "scopes": ["public"]}],
    "promptRules": [{"prompts": ["greet"], "scopes": []}],
}


def authz(issuer, tmp_path):
    policy = policy_for(issuer, authorization=RULES, audit={"sink": str(tmp_path / "audit.log")})
    return authorize.build(policy, SharedState("s"))


async def judged(stage, ctx, *scopes: str):
    terminal = Terminal()
    ctx = derive(ctx, caller=Caller(subject="alice", scopes=frozenset(scopes), issuer="i"))
    outcome = await run_chain(lambda c: stage(c, terminal), ctx)
    return outcome, terminal.seen


async def test_a_denied_notification_is_refused_audited_and_never_forwarded(issuer, tmp_path):
    stage = authz(issuer, tmp_path)
    note = derive(context(params={"name": "deploy"}), request_id=None, kind=NOTIFICATION)
    outcome, seen = await judged(stage, note, "public")
    assert outcome.status == 403 and seen == [] and outcome.message["id"] is None
    outcome, seen = await judged(stage, derive(note, params={"name": "public_time"}), "public")
    assert outcome.status == 200 and len(seen) == 1
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(line["tool"], line["allowed"], line["requestId"]) for line in lines] == [
        ("deploy", False, None), ("public_time", True, None)]


@pytest.mark.parametrize(("params", "code"), [
    ({"ref": {"type": "ref/resource", "uri": "file:///public/{a}/{b}"}}, None),
    ({"ref": {"type": "ref/resource", "uri": "file:///private/{a}"}}, FORBIDDEN),
    ({"ref": {"type": "ref/resource", "uri": "file:///public/%2e%2e/private"}}, INVALID_PARAMS),
    ({"ref": {"type": "ref/prompt", "name": "greet"}}, None),
    ({"ref": {"type": "ref/prompt", "name": "admin"}}, FORBIDDEN),
    ({"ref": {"type": "ref/prompt", "name": 3}}, INVALID_PARAMS),
    ({"ref": "greet"}, INVALID_PARAMS),
    ({}, INVALID_PARAMS),
])
async def test_completion_refs_are_judged(issuer, tmp_path, params, code):
    outcome, seen = await judged(authz(issuer, tmp_path), context("completion/complete", params), "public")
    assert outcome.message.get("error", {}).get("code") == code
    assert len(seen) == (1 if code is None else 0)


@pytest.mark.parametrize(("method", "uri", "code"), [
    ("resources/read", "toolmesh://results/AbC-_09", None),
    ("resources/read", "toolmesh://results/AbC-_09?page=2", None),
    ("resources/read", "toolmesh://results/a/b", FORBIDDEN),
    ("resources/read", "toolmesh://results/a?page=2&x=1", FORBIDDEN),
    ("resources/read", "toolmesh://elsewhere/a", FORBIDDEN),
    ("resources/read", "toolmesh://results/../../etc", INVALID_PARAMS),
    ("resources/subscribe", "toolmesh://results/AbC", FORBIDDEN),
])
async def test_only_an_exact_results_page_skips_the_rules(issuer, tmp_path, method, uri, code):
    outcome, _ = await judged(authz(issuer, tmp_path), context(method, {"uri": uri}), "public")
    assert outcome.message.get("error", {}).get("code") == code


async def test_ambiguous_uris_are_hidden_from_lists(issuer, tmp_path):
    stage = authz(issuer, tmp_path)
    listed = [{"uri": u, "name": u} for u in ("file:///public/a/b", "file:///public/../x", "FILE:///public/c",
                                               "file:///public/%2e%2e/x", "file:///private/y")]

    async def upstream(ctx):
        return Outcome(message={"jsonrpc": "2.0", "id": 7, "result": {"resources": listed}})

    ctx = derive(context("resources/list"), caller=Caller(subject="alice", scopes=frozenset({"public"}), issuer="i"))
    outcome = await run_chain(lambda c: stage(c, upstream), ctx)
    assert [r["uri"] for r in outcome.message["result"]["resources"]] == ["file:///public/a/b", "FILE:///public/c"]


async def test_a_list_sent_as_a_notification_is_filtered_if_answered(issuer, tmp_path):
    stage = authz(issuer, tmp_path)
    tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("public_time", "deploy")]

    async def careless_upstream(ctx):
        return Outcome(message={"jsonrpc": "2.0", "id": None, "result": {"tools": tools}}, status=200)

    note = derive(context("tools/list"), request_id=None, kind=NOTIFICATION,
                  caller=Caller(subject="alice", scopes=frozenset({"public"}), issuer="i"))
    outcome = await run_chain(lambda c: stage(c, careless_upstream), note)
    assert [t["name"] for t in outcome.message["result"]["tools"]] == ["public_time"]
