"""Authentication and authorization stages as pure objects: real tokens, real keys, a real JWKS over loopback HTTP."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
from helpers.tokens import JwksServer, TokenIssuer, tampered
from multidict import CIMultiDict

from toolmesh.api.policy import PolicyError, PolicyFile
from toolmesh.sidecar.chain.frame import NOTIFICATION, CallContext, Caller, Outcome, run_chain
from toolmesh.sidecar.chain.stages.jwt_verify import scopes_of
from toolmesh.sidecar.chain.pipeline import forward_headers
from toolmesh.sidecar.chain.protected_resource import metadata_document
from toolmesh.sidecar.chain.stages import authenticate, authorize
from toolmesh.sidecar.chain.state import SharedState


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer()


@pytest.fixture(scope="module")
def jwks(issuer):
    with JwksServer(issuer) as server:
        yield server


def policy_for(issuer: TokenIssuer, *, key: dict, **sections):
    auth = {"issuers": [{"issuer": issuer.issuer, "audiences": [issuer.audience], **key}], **sections.pop("auth", {})}
    return PolicyFile.parse({"auth": auth, **sections})


def context(token: str | None = None, method: str = "tools/call", params=None, **headers) -> CallContext:
    h = CIMultiDict({"Host": "127.0.0.1:7400", **headers})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    params = {"name": "echo", "arguments": {}} if params is None and method == "tools/call" else (params or {})
    return CallContext(method=method, request_id=7, params=params, raw=b"", headers=h)


class Terminal:
    """Stands for the rest of the chain: records the caller it was given and answers with a fixed result."""

    def __init__(self, result=None):
        self.seen: list[CallContext] = []
        self.result = result if result is not None else {"content": []}

    async def __call__(self, ctx: CallContext) -> Outcome:
        self.seen.append(ctx)
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": self.result})


async def through(stage, ctx, terminal=None):
    terminal = terminal or Terminal()

    async def handler(c):
        return await stage(c, terminal)

    return await run_chain(handler, ctx), terminal


# --- authenticate ---------------------------------------------------------------------------


async def test_rs256_token_from_jwks_yields_the_caller(issuer, jwks):
    stage = authenticate.build(policy_for(issuer, key={"jwksUrl": jwks.url}), SharedState("s"))
    outcome, terminal = await through(stage, context(issuer.token("alice", "db:read tools:echo")))
    assert outcome.status == 200
    caller = terminal.seen[0].caller
    assert caller.subject == "alice" and caller.scopes == {"db:read", "tools:echo"}
    assert caller.issuer == issuer.issuer


async def test_es256_token_with_pem_key(issuer):
    stage = authenticate.build(policy_for(issuer, key={"publicKey": issuer.public_pem("ec"), "algorithms": ["ES256"]}),
                               SharedState("s"))  # fmt: skip
    outcome, terminal = await through(stage, context(issuer.token("bob", ["a", "b"], alg="ES256")))
    assert outcome.status == 200 and terminal.seen[0].caller.scopes == {"a", "b"}
    # The same issuer's RS256 token is refused: RS256 is not on this issuer's allow-list.
    outcome, _ = await through(stage, context(issuer.token("bob", alg="RS256")))
    assert outcome.status == 401


async def test_hs256_token_with_secret(issuer):
    stage = authenticate.build(policy_for(issuer, key={"secret": issuer.secret}), SharedState("s"))
    outcome, terminal = await through(stage, context(issuer.token("carol", "x", alg="HS256")))
    assert outcome.status == 200 and terminal.seen[0].caller.subject == "carol"


def attacks(issuer: TokenIssuer) -> dict[str, tuple[str, str]]:
    now = int(time.time())
    return {
        "alg none": (issuer.unsigned_token(), "signature algorithm not allowed"),
        "hs256 with the rsa public key": (issuer.hs256_with_public_key(), "signature algorithm not allowed"),
        "expired": (issuer.token(exp=now - 120), "token expired"),
        "not yet valid": (issuer.token(nbf=now + 600), "token not yet valid"),
        "wrong audience": (issuer.token(aud="someone-else"), "audience"),
        "wrong issuer": (issuer.token(iss="https://evil.test"), "untrusted issuer"),
        "unknown kid": (issuer.token(kid="nobody"), "unknown signing key"),
        "tampered payload": (tampered(issuer.token("alice", "x"), scope="mcp:admin"), "bad signature"),
        "no exp": (issuer.token(exp=None), "exp"),
        "no aud": (issuer.token(aud=None), "aud"),
        "garbage": ("not.a.jwt", "malformed token"),
    }


@pytest.mark.parametrize("attack", list(attacks(TokenIssuer()).keys()))
async def test_attacks_are_refused_with_401(issuer, jwks, attack):
    stage = authenticate.build(policy_for(issuer, key={"jwksUrl": jwks.url}, audit={"sink": "stdout"}), SharedState("s"))
    token, reason = attacks(issuer)[attack]
    outcome, terminal = await through(stage, context(token))
    assert outcome.status == 401, outcome
    assert terminal.seen == []
    assert reason in outcome.message["error"]["message"]
    challenge = outcome.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="invalid_token"' in challenge
    assert 'resource_metadata="http://127.0.0.1:7400/.well-known/oauth-protected-resource"' in challenge


async def test_missing_token_gets_a_challenge_without_error_code(issuer):
    stage = authenticate.build(policy_for(issuer, key={"secret": issuer.secret}, auth={"trustForwardedHeaders": True}), SharedState("s"))
    outcome, _ = await through(stage, context(None, **{"X-Forwarded-Proto": "https", "Host": "tools.example"}))
    assert outcome.status == 401
    assert outcome.headers["WWW-Authenticate"] == (
        'Bearer resource_metadata="https://tools.example/.well-known/oauth-protected-resource"'
    )
    outcome, _ = await through(stage, context(None, Authorization="Basic dXNlcjpwdw=="))
    assert outcome.status == 401 and 'error="invalid_request"' in outcome.headers["WWW-Authenticate"]


async def test_optional_auth_lets_anonymous_in_but_still_rejects_bad_tokens(issuer):
    policy = policy_for(issuer, key={"secret": issuer.secret}, auth={"required": False})
    stage = authenticate.build(policy, SharedState("s"))
    outcome, terminal = await through(stage, context(None))
    assert outcome.status == 200 and terminal.seen[0].caller.subject == "anonymous"
    outcome, _ = await through(stage, context("bad.token.here"))
    assert outcome.status == 401


async def test_verified_tokens_are_cached_until_expiry(issuer):
    stage = authenticate.build(policy_for(issuer, key={"secret": issuer.secret}), SharedState("s"))
    token = issuer.token(alg="HS256")
    for _ in range(5):
        outcome, _ = await through(stage, context(token))
        assert outcome.status == 200
    assert stage.verifier.verifications == 1


async def test_unknown_kid_refreshes_jwks_once_within_the_refresh_interval(issuer):
    rotating = TokenIssuer(issuer="https://rotating.test")
    with JwksServer(rotating) as server:
        policy = policy_for(rotating, key={"jwksUrl": server.url, "jwksMinRefreshSeconds": 3600})
        shared = SharedState("s")
        stage = authenticate.build(policy, shared)
        outcome, _ = await through(stage, context(rotating.token("a")))
        assert outcome.status == 200 and server.fetches == 1
        # Made-up kids do not turn into a fetch each: the refresh interval has not passed.
        for kid in ("x1", "x2", "x3"):
            outcome, _ = await through(stage, context(rotating.token("a", kid=kid)))
            assert outcome.status == 401
        assert server.fetches == 1

        rotating.rotate_rsa("rsa-2")
        fresh = SharedState("s")
        policy = policy_for(rotating, key={"jwksUrl": server.url, "jwksMinRefreshSeconds": 0})
        stage = authenticate.build(policy, fresh)
        outcome, _ = await through(stage, context(rotating.token("a")))
        assert outcome.status == 200
        before = server.fetches
        rotating.rotate_rsa("rsa-3")  # the issuer rotates: the new kid is unknown to the cached JWKS
        outcome, _ = await through(stage, context(rotating.token("a")))
        assert outcome.status == 200 and server.fetches == before + 1


async def test_jwks_cache_survives_a_policy_reload(issuer, jwks):
    shared = SharedState("s")
    policy = policy_for(issuer, key={"jwksUrl": jwks.url})
    before = jwks.fetches
    for _ in range(2):
        stage = authenticate.build(policy, shared)
        outcome, _ = await through(stage, context(issuer.token("a")))
        assert outcome.status == 200
    assert jwks.fetches == before + 1


async def test_unreachable_jwks_is_a_401_not_a_crash(issuer):
    policy = policy_for(issuer, key={"jwksUrl": "http://127.0.0.1:9/jwks.json"})
    stage = authenticate.build(policy, SharedState("s"))
    outcome, _ = await through(stage, context(issuer.token("a")))
    assert outcome.status == 401
    assert "unavailable" in outcome.message["error"]["message"]


def test_bad_pem_and_missing_secret_env_are_policy_errors(issuer):
    bad_pem = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    with pytest.raises(PolicyError, match="publicKey"):
        authenticate.build(policy_for(issuer, key={"publicKey": bad_pem}), SharedState("s"))
    with pytest.raises(PolicyError, match="TOOLMESH_ABSENT"):
        authenticate.build(policy_for(issuer, key={"secretEnv": "TOOLMESH_ABSENT"}), SharedState("s"))


def test_scopes_from_scope_or_scp():
    assert scopes_of({"scope": "a b  c"}) == {"a", "b", "c"}
    assert scopes_of({"scp": ["a", "b", 3]}) == {"a", "b"}
    assert scopes_of({"scp": "a b"}) == {"a", "b"}
    assert scopes_of({}) == frozenset()


async def test_notifications_also_need_a_token(issuer):
    stage = authenticate.build(policy_for(issuer, key={"secret": issuer.secret}), SharedState("s"))
    ctx = replace(context(None, method="notifications/initialized"), request_id=None, kind=NOTIFICATION)
    outcome, _ = await through(stage, ctx)
    assert outcome.status == 401


# --- authorize ------------------------------------------------------------------------------

RULES = {
    "rules": [
        {"tools": ["query_database"], "scopes": ["db:read", "admin"]},
        {"tools": ["search_*"], "scopes": ["code:read", "admin"]},
        {"tools": ["public_*"], "scopes": []},
    ],
    "resourceRules": [{"resources": ["file:///docs/*"], "scopes": ["docs:read"]}],
    "promptRules": [{"prompts": ["greet"], "scopes": []}],
}


def authz_stage(issuer, tmp_path=None, **authorization):
    sections = {"authorization": {**RULES, **authorization}}
    if tmp_path is not None:
        sections["audit"] = {"sink": str(tmp_path / "audit.log")}
    policy = policy_for(issuer, key={"secret": issuer.secret}, **sections)
    return authorize.build(policy, SharedState("srv")), policy


def with_caller(ctx: CallContext, *scopes: str, subject: str = "alice") -> CallContext:
    return replace(ctx, caller=Caller(subject=subject, scopes=frozenset(scopes), issuer="i"))


@pytest.mark.parametrize(
    ("tool", "scopes", "status"),
    [
        ("query_database", ["db:read"], 200),
        ("query_database", ["admin"], 200),
        ("query_database", ["db:write"], 403),
        ("search_code", ["code:read"], 200),
        ("public_time", [], 200),
        ("deploy", ["admin"], 403),  # unlisted: needs the default mcp:admin
        ("deploy", ["mcp:admin"], 200),
    ],
)
async def test_tool_scopes_any_of_with_globs(issuer, tool, scopes, status):
    stage, _ = authz_stage(issuer)
    ctx = with_caller(context(params={"name": tool, "arguments": {}}), *scopes)
    outcome, terminal = await through(stage, ctx)
    assert outcome.status == status
    assert len(terminal.seen) == (1 if status == 200 else 0)


async def test_insufficient_scope_challenge(issuer):
    stage, _ = authz_stage(issuer)
    outcome, _ = await through(stage, with_caller(context(params={"name": "query_database"}), "nothing"))
    assert outcome.status == 403
    challenge = outcome.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="db:read admin"' in challenge
    assert outcome.message["error"]["data"] == {"requiredScopes": ["db:read", "admin"]}


async def test_resources_and_prompts_follow_the_same_rules(issuer):
    stage, _ = authz_stage(issuer)
    read = context(method="resources/read", params={"uri": "file:///docs/readme.md"})
    assert (await through(stage, with_caller(read, "docs:read")))[0].status == 200
    assert (await through(stage, with_caller(read, "other")))[0].status == 403
    secret = context(method="resources/read", params={"uri": "file:///etc/shadow"})
    assert (await through(stage, with_caller(secret, "docs:read")))[0].status == 403
    own = context(method="resources/read", params={"uri": "toolmesh://results/abc"})
    assert (await through(stage, with_caller(own, "other")))[0].status == 200
    prompt = context(method="prompts/get", params={"name": "greet"})
    assert (await through(stage, with_caller(prompt)))[0].status == 200
    prompt = context(method="prompts/get", params={"name": "admin_prompt"})
    assert (await through(stage, with_caller(prompt)))[0].status == 403


async def test_lists_show_only_what_the_caller_may_use(issuer):
    stage, _ = authz_stage(issuer)
    tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("query_database", "search_code", "public_time", "deploy")]
    page = Terminal({"tools": tools, "nextCursor": "page-2"})
    outcome, _ = await through(stage, with_caller(context(method="tools/list", params={}), "code:read"), page)
    result = json.loads(outcome.body())["result"]
    assert [t["name"] for t in result["tools"]] == ["search_code", "public_time"]
    assert result["nextCursor"] == "page-2"
    # A raw (unparsed) upstream answer is filtered the same way.
    raw = json.dumps({"jsonrpc": "2.0", "id": 7, "result": {"tools": tools}}).encode()

    async def raw_terminal(ctx):
        return Outcome(raw=raw)

    outcome = await run_chain(lambda c: stage(c, raw_terminal), with_caller(context(method="tools/list", params={}), "admin"))
    assert [t["name"] for t in json.loads(outcome.body())["result"]["tools"]] == ["query_database", "search_code", "public_time"]

    resources = Terminal({"resources": [{"uri": "file:///docs/a", "name": "a"}, {"uri": "file:///etc/b", "name": "b"}]})
    outcome, _ = await through(stage, with_caller(context(method="resources/list", params={}), "docs:read"), resources)
    assert [r["uri"] for r in json.loads(outcome.body())["result"]["resources"]] == ["file:///docs/a"]


async def test_audit_lines_never_carry_the_token(issuer, tmp_path):
    stage, policy = authz_stage(issuer, tmp_path)
    token = issuer.token("alice", "db:read", alg="HS256")
    authn = authenticate.build(policy, SharedState("srv"))

    async def chain(ctx):
        return await authn(ctx, lambda c: stage(c, Terminal()))

    assert (await run_chain(chain, context(token, params={"name": "query_database"}))).status == 200
    assert (await run_chain(chain, context(token, params={"name": "deploy"}))).status == 403
    assert (await run_chain(chain, context("forged.token.x", params={"name": "deploy"}))).status == 401
    text = (tmp_path / "audit.log").read_text()
    assert token not in text and "forged" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(line["subject"], line.get("tool"), line["allowed"]) for line in lines] == [
        ("alice", "query_database", True),
        ("alice", "deploy", False),
        (None, "deploy", False),
    ]
    for line in lines:
        assert {"time", "requestId", "subject", "method", "allowed", "reason"} <= line.keys()
        assert line["requestId"] == 7 and line["method"] == "tools/call"
    assert "insufficient scope" in lines[1]["reason"] and "unauthenticated" in lines[2]["reason"]


def test_protected_resource_metadata(issuer):
    policy = policy_for(issuer, key={"secret": issuer.secret}, authorization=RULES)
    doc = metadata_document(policy, CIMultiDict({"Host": "127.0.0.1:7400"}))
    assert doc == {
        "resource": "http://127.0.0.1:7400/mcp",
        "authorization_servers": [issuer.issuer],
        "scopes_supported": ["db:read", "admin", "code:read", "docs:read", "mcp:admin"],
        "bearer_methods_supported": ["header"],
    }
    policy = policy_for(issuer, key={"secret": issuer.secret}, auth={"resource": "https://tools.example/mcp"})
    assert metadata_document(policy, {})["resource"] == "https://tools.example/mcp"
    assert metadata_document(PolicyFile.parse({}), {}) is None


async def test_upstream_sees_the_verified_identity_only(issuer):
    stage = authenticate.build(policy_for(issuer, key={"secret": issuer.secret}), SharedState("s"))
    token = issuer.token("alice", "b a", alg="HS256")
    spoofed = {"X-Toolmesh-Subject": "root", "x-toolmesh-scopes": "mcp:admin", "X-Toolmesh-Extra": "1"}
    outcome, terminal = await through(stage, context(token, **spoofed))
    assert outcome.status == 200
    seen = terminal.seen[0]
    sent = forward_headers(seen.headers, seen.caller)
    assert {k.lower() for k in sent} == {"x-toolmesh-subject", "x-toolmesh-scopes"}
    assert sent["X-Toolmesh-Subject"] == "alice" and sent["X-Toolmesh-Scopes"] == "a b"
    # Without auth no identity is forwarded, and a client's is dropped all the same.
    assert forward_headers(context(token, **spoofed).headers) == {"Authorization": f"Bearer {token}"}


async def test_subject_with_control_characters_is_refused(issuer):
    stage = authenticate.build(policy_for(issuer, key={"secret": issuer.secret}), SharedState("s"))
    outcome, _ = await through(stage, context(issuer.token("alice\r\nX-Evil: 1", alg="HS256")))
    assert outcome.status == 401


async def test_anonymous_caller_denied_by_scope_is_asked_to_authenticate(issuer):
    policy = policy_for(issuer, key={"secret": issuer.secret}, auth={"required": False}, authorization=RULES)
    shared = SharedState("s")
    authn, authz = authenticate.build(policy, shared), authorize.build(policy, shared)

    async def chain(ctx):
        return await authn(ctx, lambda c: authz(c, Terminal()))

    assert (await run_chain(chain, context(None, params={"name": "public_time"}))).status == 200
    outcome = await run_chain(chain, context(None, params={"name": "query_database"}))
    assert outcome.status == 401
    assert outcome.headers["WWW-Authenticate"].startswith('Bearer resource_metadata="')
    assert 'scope="db:read admin"' in outcome.headers["WWW-Authenticate"]
    token = issuer.token("alice", "other", alg="HS256")
    assert (await run_chain(chain, context(token, params={"name": "query_database"}))).status == 403


async def test_jwks_keys_are_kept_when_the_issuer_goes_down():
    from toolmesh.sidecar.chain.stages.jwks import JwksKeys, JwksUnavailable

    now = [0.0]
    rotating = TokenIssuer("https://flaky.test")
    server = JwksServer(rotating)
    with server:
        keys = JwksKeys(server.url, cache_seconds=60, min_refresh_seconds=5, clock=lambda: now[0])
        assert (await keys.key("rsa-1")) is not None and keys.fetches == 1
        assert (await keys.key("rsa-1")) is not None and keys.fetches == 1  # cached
    now[0] = 120.0  # stale, and the issuer is gone: the last good keys still verify
    assert (await keys.key("rsa-1")) is not None and keys.fetches == 2
    assert (await keys.key("nope")) is None and keys.fetches == 2  # refresh throttled
    never = JwksKeys(server.url, clock=lambda: now[0])
    with pytest.raises(JwksUnavailable):
        await never.key("rsa-1")
    with pytest.raises(JwksUnavailable):  # and no second fetch within the refresh interval
        await never.key("rsa-1")
    assert never.fetches == 1
