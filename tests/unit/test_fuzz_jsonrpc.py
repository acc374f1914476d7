"""Fuzzing the JSON-RPC parsing path: random bytes and structured-but-wrong JSON-RPC never crash or hang the sidecar.

Three levels: the parsing functions, the policy stages fed random params and
random upstream answers, and a real sidecar (auth on) that gets the same
garbage over HTTP and must keep answering with JSON-RPC.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import httpx2
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from helpers.mcp_servers import sdk_http_server
from helpers.sidecar import ready, sidecar
from helpers.tokens import TokenIssuer
from toolmesh.api.policy import PolicyFile
from toolmesh.sidecar.chain.frame import REQUEST, CallContext, Caller, Outcome, compose, run_chain
from toolmesh.sidecar.errors import Refused
from toolmesh.sidecar.chain.jsonrpc import classify, loads
from toolmesh.sidecar.chain.stages import authenticate, authorize, rate_limit
from toolmesh.sidecar.chain.state import SharedState

# TOOLMESH_FUZZ_SCALE=20 runs twenty times as many examples, for a deeper search than CI makes.
SCALE = int(os.environ.get("TOOLMESH_FUZZ_SCALE", "1"))

METHODS = [
    "initialize", "ping", "tools/list", "tools/call", "resources/list", "resources/read", "resources/templates/list",
    "resources/subscribe", "prompts/list", "prompts/get", "notifications/initialized", "notifications/cancelled",
    "server/discover", "completion/complete", "logging/setLevel",
]  # fmt: skip



def json_of(integers):
    scalars = st.none() | st.booleans() | integers | st.floats(allow_nan=False) | st.text(max_size=12)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=16,
    )


# What a client may send (integers beyond 64 bits included), and what a parsed message can hold.
json_values = json_of(st.integers(-(2**70), 2**70))
parsed_values = json_of(st.integers(-(2**63), 2**63 - 1))
names = st.sampled_from(["echo", "add", "*", "", "../etc", "a" * 300, "tööl"]) | st.text(max_size=10)


def params_of(values):
    return st.fixed_dictionaries(
        {},
        optional={
            "name": names | values,
            "uri": st.sampled_from(["file:///docs/a", "toolmesh://results/x", ""]) | values,
            "arguments": values,
            "cursor": values,
            "_meta": values,
        },
    )


params = params_of(json_values)
messages = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2.0, None])},
    optional={
        "id": st.integers(-(2**40), 2**40) | st.text(max_size=8) | json_values,
        "method": st.sampled_from(METHODS) | st.text(max_size=12) | json_values,
        "params": params | json_values,
        "result": json_values,
        "error": json_values,
    },
)
bodies = (
    st.binary(max_size=300)
    | messages.map(lambda m: json.dumps(m).encode())
    | st.lists(messages, max_size=4).map(lambda ms: json.dumps(ms).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
)


# --- the parsing functions --------------------------------------------------------------------


@given(bodies)
@settings(max_examples=300 * SCALE, deadline=None)
def test_parsing_either_classifies_or_refuses(body):
    try:
        message = loads(body)
        if isinstance(message, list):
            for item in message:
                _check_classified(item)
        else:
            _check_classified(message)
    except Refused as exc:
        assert exc.status == 400 and exc.code in (-32700, -32600)


def _check_classified(message):
    try:
        kind, method, request_id, parsed = classify(message)
    except Refused as exc:
        assert exc.code == -32600
        return
    assert isinstance(method, str) and isinstance(parsed, dict)


# --- the policy stages fed random params and random upstream answers --------------------------

POLICY = PolicyFile.parse({
    "auth": {"issuers": [{"issuer": "fuzz", "audiences": ["toolmesh"], "secret": "s" * 32}], "required": False},
    "authorization": {
        "rules": [{"tools": ["echo", "e*"], "scopes": ["a"]}, {"tools": ["public"], "scopes": []}],
        "resourceRules": [{"resources": ["file:///docs/*"], "scopes": ["d"]}],
    },
    "rateLimit": {"requestsPerSecond": 1e6, "burst": 1_000_000},
})


upstream_results = parsed_values | st.fixed_dictionaries({}, optional={
    key: st.lists(st.fixed_dictionaries({}, optional={"name": names | parsed_values, "uri": parsed_values,
                                                      "uriTemplate": parsed_values}), max_size=4) | parsed_values
    for key in ("tools", "resources", "resourceTemplates", "prompts")
} | {"nextCursor": parsed_values})


@given(st.sampled_from(METHODS) | st.text(max_size=10), params_of(parsed_values), upstream_results, st.booleans(),
       st.sampled_from([None, "Bearer x.y.z", "Bearer ", "Basic abc", "bearer " + "A" * 20000]))
@settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
async def test_stages_never_fail_internally(method, call_params, upstream_result, with_caller, authorization):
    shared = SharedState("fuzz")
    stages = [m.build(POLICY, shared) for m in (authenticate, authorize, rate_limit)]

    async def upstream(ctx: CallContext) -> Outcome:
        return Outcome(message={"jsonrpc": "2.0", "id": ctx.request_id, "result": upstream_result})

    headers = CIMultiDict({"Host": "127.0.0.1"})
    if authorization is not None:
        headers["Authorization"] = authorization
    ctx = CallContext(method=method, request_id=1, params=call_params, raw=b"{}", headers=headers, kind=REQUEST)
    if with_caller:
        ctx = replace(ctx, caller=Caller("u", frozenset({"a"})))
    outcome = await run_chain(compose(stages, upstream), ctx)
    assert outcome.status in (200, 401, 403, 429), outcome
    body = json.loads(outcome.body())
    assert body["id"] == 1 and ("result" in body or "error" in body)


# --- a real sidecar ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed_sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    issuer = TokenIssuer("fuzz-issuer")
    policy = {
        "auth": issuer.hmac_auth(),
        "authorization": {"defaultScopes": ["mcp:admin"]},
        "rateLimit": {"requestsPerSecond": 100000, "burst": 100000},
    }
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
    with sdk_http_server(stateless=True, json_response=True, log_path=tmp / "server.log") as upstream, \
            sidecar(["--upstream", upstream], tmp, "--policy", str(tmp / "policy.yaml")) as sc:
        with httpx2.Client(timeout=10) as http:
            yield sc, http, issuer.token("fuzzer", "mcp:admin", alg="HS256", ttl=3600)


def _json_rpc_answers(resp: httpx2.Response) -> list:
    content_type = resp.headers.get("Content-Type", "")
    if not resp.content:
        return []
    if content_type.startswith("text/event-stream"):
        return [json.loads(line[5:]) for line in resp.text.splitlines() if line.startswith("data:") and line[5:].strip()]
    assert content_type.startswith("application/json"), (resp.status_code, content_type, resp.content[:200])
    body = resp.json()
    return body if isinstance(body, list) else [body]


@given(bodies, st.booleans())
@settings(max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_real_sidecar_answers_garbage_with_json_rpc(fuzzed_sidecar, body, with_token):
    sc, http, token = fuzzed_sidecar
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2026-07-28"}
    if with_token:
        headers["Authorization"] = f"Bearer {token}"
    resp = http.post(sc.url, content=body, headers=headers)  # the client's 10 s timeout: no hang
    assert resp.status_code < 500, (resp.status_code, body[:200], resp.text[:300])
    for answer in _json_rpc_answers(resp):
        assert answer.get("jsonrpc") == "2.0" and ("result" in answer or "error" in answer), answer
        if "error" in answer:
            assert isinstance(answer["error"]["code"], int) and isinstance(answer["error"]["message"], str)
    assert sc.proc.poll() is None


def test_real_sidecar_still_serves_after_the_fuzzing(fuzzed_sidecar):
    sc, http, token = fuzzed_sidecar
    assert ready(sc.base)
    resp = http.post(sc.url, content=b"\xff\xfe garbage", headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == -32700
