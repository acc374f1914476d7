"""Hostile calls against a real sidecar's authorization: path tricks in resource URIs, notifications and batches that
dodge decisions, completion refs, toolmesh:// look-alikes, scope-splitting tricks, header injection through names, and
forwarded headers. A recording upstream shows what got through, byte for byte."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx2
import jwt
import orjson
import pytest
from aiohttp import web

from helpers import free_port
from helpers.sidecar import guarded_sidecar
from helpers.tokens import TokenIssuer
from toolmesh.api.jsonrpc import FORBIDDEN, INVALID_PARAMS

ACCEPT = "application/json, text/event-stream"
JSON_HEADERS = {"Content-Type": "application/json", "Accept": ACCEPT}
LISTED = [
    {"uri": "file:///public/readme.md", "name": "readme"},
    {"uri": "file:///public/../secret/key", "name": "climb"},
    {"uri": "file:///public/%2e%2e/secret/key", "name": "encoded climb"},
    {"uri": "file:///public/deeper/file", "name": "deeper"},
    {"uri": "file:///secret/key", "name": "secret"},
]
ATTACKS = [
    "file:///public/../secret/key",
    "file:///public/%2e%2e/secret/key",
    "file:///public/..%2fsecret",
    "file:///public/./../secret",
    "file:///public//../../secret",
    "file:///public/..;/secret",
    "file:///public/%C0%AE%C0%AE/secret",
    "file:///public/x\\..\\..\\secret",
]


class RecordingUpstream:
    """A Streamable HTTP server at /mcp, in a thread, that keeps every message it gets and answers each plainly."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.bodies: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def messages(self) -> list[dict]:
        return [orjson.loads(body) for body in list(self.bodies)]

    def received(self, method: str) -> list[dict]:
        return [m for m in self.messages() if m.get("method") == method]

    async def _mcp(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return web.Response(status=405 if request.method == "GET" else 200)
        body = await request.read()
        message = orjson.loads(body)
        if message.get("method") != "initialize":
            self.bodies.append(body)
        if "id" not in message:
            return web.Response(status=202)
        method = message.get("method")
        params = message.get("params") or {}
        if method == "initialize":
            result = {"protocolVersion": params.get("protocolVersion", "2025-06-18"),
                      "capabilities": {"tools": {}, "resources": {"subscribe": True}, "prompts": {}, "completions": {}},
                      "serverInfo": {"name": "recording", "version": "1"}}
        elif method == "resources/list":
            result = {"resources": LISTED}
        elif method == "resources/read":
            result = {"contents": [{"uri": params.get("uri"), "text": "contents"}]}
        elif method == "completion/complete":
            result = {"completion": {"values": ["x"]}}
        elif method == "tools/call":
            result = {"content": [{"type": "text", "text": "done"}]}
        else:
            result = {}
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_route("*", "/mcp", self._mcp)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def __enter__(self) -> RecordingUpstream:
        self._thread = threading.Thread(target=self._run, name="recording-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("recording upstream did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer("https://hostile.test")


@pytest.fixture(scope="module")
def other_issuer():
    """An issuer whose tokens carry their scopes in a `scopes` list (the claim shape some articles use)."""
    return TokenIssuer("https://scopes-list.test")


@pytest.fixture(scope="module")
def setup(issuer, other_issuer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("authz-hostile")
    policy = {
        "auth": {"issuers": [
            {"issuer": issuer.issuer, "audiences": [issuer.audience], "publicKey": issuer.public_pem("rsa")},
            {"issuer": other_issuer.issuer, "audiences": [other_issuer.audience],
             "publicKey": other_issuer.public_pem("ec"), "scopeClaim": "scopes"},
        ]},
        "authorization": {
            "rules": [{"tools": ["public_*"], "scopes": []}],
            "resourceRules": [{"resources": ["file:///public/*"], "scopes": ["public"]}],
            "promptRules": [{"prompts": ["greet"], "scopes": []}],
        },
        "audit": {"sink": str(tmp / "audit.log")},
    }
    with RecordingUpstream() as upstream, \
            guarded_sidecar(["--upstream", upstream.url], tmp, policy) as sc:
        sc.audit_path = tmp / "audit.log"
        yield sc, upstream


def audit_lines(sc) -> list[dict]:
    return [json.loads(line) for line in sc.audit_path.read_text().splitlines()]


async def post(url: str, message, token: str | None = None, **headers: str) -> httpx2.Response:
    headers = {**JSON_HEADERS, **headers}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(url, content=orjson.dumps(message), headers=headers)


def request(method: str, params: dict, request_id=1) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


def notification(method: str, params: dict) -> dict:
    return {"jsonrpc": "2.0", "method": method, "params": params}


# --- A: resource URIs ------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ATTACKS)
@pytest.mark.parametrize("method", ["resources/read", "resources/subscribe", "resources/unsubscribe"])
async def test_path_tricks_never_reach_the_upstream(setup, issuer, method, uri):
    sc, upstream = setup
    resp = await post(sc.url, request(method, {"uri": uri}, "trick"), issuer.token("reader", "public"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["error"]["code"] == INVALID_PARAMS
    assert "resource URI refused" in resp.json()["error"]["message"]
    assert all(m["params"]["uri"] != uri for m in upstream.received(method))
    assert [line for line in audit_lines(sc) if line.get("resource") == uri and line["method"] == method][-1][
        "allowed"] is False


async def test_a_public_resource_passes_as_the_client_wrote_it(setup, issuer):
    sc, upstream = setup
    token = issuer.token("reader", "public")
    # %72 is "r": the rules read readme.md, the upstream gets the client's bytes.
    message = request("resources/read", {"uri": "file:///public/%72eadme.md"}, "encoded")
    resp = await post(sc.url, message, token)
    assert resp.status_code == 200, resp.text
    assert orjson.dumps(message) in upstream.bodies
    assert (await post(sc.url, request("resources/read", {"uri": "file:///public/deeper/file"}), token)).status_code == 403


async def test_resource_lists_hide_ambiguous_and_deeper_uris(setup, issuer):
    sc, _ = setup
    resp = await post(sc.url, request("resources/list", {}), issuer.token("reader", "public"))
    assert [r["uri"] for r in resp.json()["result"]["resources"]] == ["file:///public/readme.md"]


@pytest.mark.parametrize(("ref", "code"), [
    ({"type": "ref/resource", "uri": "file:///public/{name}"}, None),
    ({"type": "ref/resource", "uri": "file:///secret/{name}"}, FORBIDDEN),
    ({"type": "ref/resource", "uri": "file:///public/../secret/{name}"}, INVALID_PARAMS),
    ({"type": "ref/prompt", "name": "greet"}, None),
    ({"type": "ref/prompt", "name": "admin_prompt"}, FORBIDDEN),
    ({"type": "ref/other", "name": "greet"}, INVALID_PARAMS),
    ({"type": "ref/prompt"}, INVALID_PARAMS),
])
async def test_completion_refs_follow_the_prompt_and_resource_rules(setup, issuer, ref, code):
    sc, upstream = setup
    params = {"ref": ref, "argument": {"name": "name", "value": "a"}}
    resp = await post(sc.url, request("completion/complete", params, "complete"), issuer.token("reader", "public"))
    assert resp.json().get("error", {}).get("code") == code, resp.text
    assert resp.status_code == (403 if code == FORBIDDEN else 200)
    assert (params in [m["params"] for m in upstream.received("completion/complete")]) is (code is None)


# --- D: notifications, batches, toolmesh:// ----------------------------------------------------


@pytest.mark.parametrize(("method", "params"), [
    ("tools/call", {"name": "deploy", "arguments": {"target": "prod"}}),
    ("resources/read", {"uri": "file:///secret/key"}),
    ("resources/read", {"uri": "file:///public/../secret/key"}),
    ("prompts/get", {"name": "admin_prompt"}),
    ("resources/subscribe", {"uri": "toolmesh://results/x"}),
])
async def test_denied_notifications_are_dropped_and_audited(setup, issuer, method, params):
    sc, upstream = setup
    resp = await post(sc.url, notification(method, params), issuer.token("notifier", "public"))
    assert resp.status_code in (400, 403), resp.text
    assert resp.json()["id"] is None
    assert params not in [m["params"] for m in upstream.received(method)]
    line = [line for line in audit_lines(sc) if line["subject"] == "notifier" and line["method"] == method][-1]
    assert line["allowed"] is False and line["requestId"] is None


async def test_an_allowed_notification_is_forwarded(setup, issuer):
    sc, upstream = setup
    params = {"name": "public_time", "arguments": {"marker": "allowed-notification"}}
    resp = await post(sc.url, notification("tools/call", params), issuer.token("notifier", "public"))
    assert resp.status_code == 202, resp.text
    assert params in [m["params"] for m in upstream.received("tools/call")]


async def test_each_batch_element_gets_its_own_decision(setup, issuer):
    sc, upstream = setup
    batch = [
        request("tools/call", {"name": "public_time", "arguments": {"marker": "batch-ok"}}, "ok"),
        notification("tools/call", {"name": "deploy", "arguments": {"marker": "batch-note"}}),
        request("tools/call", {"name": "deploy", "arguments": {"marker": "batch-denied"}}, "denied"),
    ]
    resp = await post(sc.url, batch, issuer.token("batcher", "public"))
    answers = {a["id"]: a for a in resp.json()}
    assert "result" in answers["ok"] and answers["denied"]["error"]["code"] == FORBIDDEN
    assert answers[None]["error"]["code"] == FORBIDDEN
    markers = [m["params"]["arguments"]["marker"] for m in upstream.received("tools/call")]
    assert "batch-ok" in markers and "batch-note" not in markers and "batch-denied" not in markers


@pytest.mark.parametrize("uri", ["toolmesh://elsewhere/key", "toolmesh://results/x/y", "toolmesh://results/x?page=1&a=b"])
async def test_toolmesh_uris_other_than_a_results_page_follow_the_rules(setup, issuer, uri):
    sc, upstream = setup
    resp = await post(sc.url, request("resources/read", {"uri": uri}), issuer.token("reader", "public"))
    assert resp.status_code == 403, resp.text
    assert all(m["params"]["uri"] != uri for m in upstream.received("resources/read"))


# --- B, C: scopes ------------------------------------------------------------------------------


def with_scopes_claim(issuer: TokenIssuer, scopes, alg: str = "ES256") -> str:
    """A token signed by `issuer` whose scopes are in a `scopes` claim."""
    key, kid = (issuer.ec_key, issuer.ec_kid) if alg == "ES256" else (issuer.rsa_key, issuer.rsa_kid)
    return jwt.encode({**issuer.claims("lister"), "scopes": scopes}, key, algorithm=alg, headers={"kid": kid})


async def test_a_no_break_space_does_not_split_scopes(setup, issuer):
    sc, upstream = setup
    token = issuer.token("splitter", "public\u00a0mcp:admin")
    params = {"name": "deploy", "arguments": {"marker": "nbsp"}}
    resp = await post(sc.url, request("tools/call", params), token)
    assert resp.status_code == 403, resp.text
    assert params not in [m["params"] for m in upstream.received("tools/call")]
    assert (await post(sc.url, request("tools/call", params), issuer.token("admin", "public mcp:admin"))).status_code == 200


async def test_scope_claim_configured_per_issuer(setup, issuer, other_issuer):
    sc, _ = setup
    read = request("resources/read", {"uri": "file:///public/readme.md"})
    listed = other_issuer.token("lister", alg="ES256", scopes=["public"])  # as `scp`: not the configured claim
    assert (await post(sc.url, read, listed)).status_code == 403
    assert (await post(sc.url, read, with_scopes_claim(other_issuer, ["public"]))).status_code == 200
    assert (await post(sc.url, read, with_scopes_claim(other_issuer, "other public"))).status_code == 200
    # The first issuer keeps the default: `scope`, then `scp`, and no `scopes`.
    assert (await post(sc.url, read, issuer.token("reader", ["public"]))).status_code == 200
    assert (await post(sc.url, read, issuer.token("reader", "public"))).status_code == 200
    assert (await post(sc.url, read, with_scopes_claim(issuer, ["public"], alg="RS256"))).status_code == 403


# --- E, F: headers built from caller input ---------------------------------------------------------


async def test_a_hostile_tool_name_gets_a_proper_403(setup, issuer):
    sc, upstream = setup
    name = "evil\r\nX-Injected: 1\x00 caf\u00e9 \u2603"
    resp = await post(sc.url, request("tools/call", {"name": name, "arguments": {}}, "hostile"),
                      issuer.token("hostile", "public"))
    assert resp.status_code == 403, resp.text
    body = resp.json()
    assert body["id"] == "hostile" and body["error"]["code"] == FORBIDDEN
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.isascii() and "X-Injected" not in challenge and "evil" not in challenge
    assert 'error="insufficient_scope"' in challenge and 'scope="mcp:admin"' in challenge
    assert "X-Injected" not in resp.headers
    assert all(m["params"]["name"] != name for m in upstream.received("tools/call"))
    assert "Traceback" not in sc.log()


async def test_forwarded_headers_are_not_trusted_by_default(setup):
    sc, _ = setup
    forged = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    resp = await post(sc.url, request("tools/call", {"name": "public_time", "arguments": {}}), **forged)
    assert resp.status_code == 401
    expected = f'resource_metadata="http://127.0.0.1:{sc.port}/.well-known/oauth-protected-resource"'
    assert expected in resp.headers["WWW-Authenticate"]
    async with httpx2.AsyncClient(timeout=10) as http:
        metadata = await http.get(f"{sc.base}/.well-known/oauth-protected-resource", headers=forged)
    assert metadata.json()["resource"] == f"http://127.0.0.1:{sc.port}/mcp"
