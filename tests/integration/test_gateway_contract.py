"""The gateway as agents meet it: a call's failure stays the call's, auth spoken at the gateway's own door, bare
names that respect the caller, the registry's /metrics, and `registry --kube` without a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web
from mcp.client import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from helpers import async_wait_until, free_port, toolmesh_cli
from helpers.fault_upstream import Fault
from helpers.registry_procs import get_json, post_heartbeat, registry_process, toy_server
from helpers.sidecar import sidecar
from helpers.tokens import TokenIssuer

SECRET = "heartbeat-secret"


def test_registry_kube_without_a_cluster_exits_2_with_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    done = toolmesh_cli("registry", "--kube", "--listen", "127.0.0.1:0", timeout=60,
                        env={"HOME": str(home), "KUBECONFIG": str(tmp_path / "no-kubeconfig")})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("toolmesh registry: --kube: cannot reach Kubernetes"), done.stderr
    assert "Traceback" not in done.stderr


# -- 1. a call's failure is the call's --------------------------------------------------------------------------


def gateway_client(registry: str, token: str | None = None, mode: str = "legacy") -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    transport = streamable_http_client(f"{registry}/mcp", http_client=create_mcp_http_client(headers=headers))
    return Client(transport, mode=mode)


async def failure(call: Awaitable[Any]) -> str | None:
    """The error message a call ends with (a JSON-RPC error or an error result), or None when it succeeds."""
    try:
        result = await call
    except Exception as exc:  # noqa: BLE001 - the SDK raises its own error type for JSON-RPC errors
        return str(exc)
    return result.content[0].text if result.is_error else None


async def answer(call: Awaitable[Any]) -> str:
    """The text a call answers with, or its error message."""
    try:
        return (await call).content[0].text
    except Exception as exc:  # noqa: BLE001
        return str(exc)


async def listed_names(client: Client) -> set[str]:
    return {t.name for t in (await client.list_tools()).tools}


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_an_upstream_503_fails_that_call_only(tmp_path, relay, mode):
    with registry_process(tmp_path, secret=SECRET) as registry, \
            sidecar(["--upstream", relay.url], tmp_path, "--server-name", "s503", "--registry", registry,
                    env={"TOOLMESH_REGISTRY_SECRET": SECRET}):
        async def listed():
            return "s503__lookup" in {t["name"] for t in (await get_json(f"{registry}/v1/tools"))["tools"]}

        await async_wait_until(listed, timeout=20, what="s503 listed")
        relay.inject("lookup", Fault("status", 503))
        async with gateway_client(registry, mode=mode) as client:
            before = await listed_names(client)
            seen = {"503 call": await failure(client.call_tool("s503__lookup", {"q": "x"})),
                    "other tool": await failure(client.call_tool("s503__whoami", {"q": "after"})),
                    "listed": await listed_names(client) == before,
                    "same tool again": await failure(client.call_tool("s503__lookup", {"q": "again"}))}
        # One call failed, saying what happened; the server's other tools still answer and its tools stay listed.
        assert seen == {"503 call": "server s503 is unavailable: it answered HTTP 503 without a JSON-RPC response",
                        "other tool": None, "listed": True, "same tool again": None}
        (server,) = (await get_json(f"{registry}/v1/servers"))["servers"]
        assert server["instances"][0]["healthy"] and server["instances"][0]["unreachable"] is None


async def test_an_unreachable_sidecar_stays_listed_and_its_calls_say_so(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    tools = [{"name": "ping", "inputSchema": {"type": "object"}}]
    # Heartbeats every minute: nothing but the gateway's own call can change what it lists meanwhile.
    with registry_process(tmp_path, interval=60) as registry:
        status, _ = await post_heartbeat(registry, {"server": "gone", "endpoint": dead, "tools": tools})
        assert status == 200
        async with gateway_client(registry) as client:
            assert "gone__ping" in await listed_names(client)
            seen = [await failure(client.call_tool("gone__ping", {})) for _ in range(2)]
            still_listed = "gone__ping" in await listed_names(client)
        assert all(re.fullmatch(r"server gone is unavailable: .*(refused|connect).*", m or "") for m in seen), seen
        assert still_listed
        (server,) = (await get_json(f"{registry}/v1/servers"))["servers"]
        assert server["instances"][0]["healthy"] and server["instances"][0]["unreachable"]


# -- 7. bare names respect the caller -----------------------------------------------------------------------------


def scoped_policy(tmp_path: Path, issuer: TokenIssuer, name: str, scope: str) -> Path:
    """A policy trusting `issuer` that lets only callers holding `scope` call echo."""
    secret = tmp_path / "jwt-secret"
    secret.write_text(issuer.secret)
    policy = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": name},
              "spec": {"auth": {"issuers": [{"issuer": issuer.issuer, "audiences": ["toolmesh"],
                                             "algorithms": ["HS256"], "secretFile": str(secret)}]},
                       "authorization": {"defaultScopes": ["mcp:admin"],
                                         "rules": [{"tools": ["echo"], "scopes": [scope]}]}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


async def test_a_bare_name_goes_to_the_best_server_that_lets_this_caller_call_it(tmp_path):
    issuer = TokenIssuer("internal-ci")
    env = {"TOOLMESH_REGISTRY_SECRET": SECRET}
    with (registry_process(tmp_path, secret=SECRET) as registry,
          toy_server(tmp_path, "high") as (_, high_url), toy_server(tmp_path, "low") as (_, low_url),
          sidecar(["--upstream", high_url], tmp_path, "--server-name", "high", "--registry", registry,
                  "--policy", str(scoped_policy(tmp_path, issuer, "high", "high:call")),
                  env={**env, "TOOLMESH_SERVER_PRIORITY": "10"}, name="high"),
          sidecar(["--upstream", low_url], tmp_path, "--server-name", "low", "--registry", registry,
                  "--policy", str(scoped_policy(tmp_path, issuer, "low", "low:call")),
                  env={**env, "TOOLMESH_SERVER_PRIORITY": "1"}, name="low")):
        async def both_listed():
            names = {t["name"] for t in (await get_json(f"{registry}/v1/tools"))["tools"]}
            return {"high__echo", "low__echo"} <= names

        await async_wait_until(both_listed, timeout=20, what="both servers listed")
        seen = {}
        for scope in ("low:call", "high:call", "high:call low:call"):
            async with gateway_client(registry, issuer.token("alice", scope, alg="HS256")) as client:
                seen[scope] = await answer(client.call_tool("echo", {"message": "bare"}))
        async with gateway_client(registry, issuer.token("mallory", "other", alg="HS256")) as client:
            seen["other"] = await failure(client.call_tool("echo", {"message": "bare"}))
        assert seen == {"low:call": "low:bare", "high:call": "high:bare", "high:call low:call": "high:bare",
                        "other": seen["other"]}
        # Nobody lists it to this caller: the winner by priority answers, and its sidecar says why not.
        assert "scope" in (seen["other"] or "")


# -- 6. the gateway speaks MCP authorization for the servers behind it ------------------------------------------


class AuthorizationServer:
    """A loopback OAuth authorization server (RFC 8414 metadata, dynamic registration, code + PKCE) minting the
    HMAC tokens the sidecar's policy trusts; it records the authorization requests clients make."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.issuer = TokenIssuer(self.url)
        self.authorizations: list[dict[str, str]] = []
        self._codes: dict[str, str] = {}
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    def __enter__(self) -> AuthorizationServer:
        self._thread.start()
        assert self._ready.wait(10), "authorization server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def authorize(self, url: str) -> AuthorizationCodeResult:
        """What a person signing in does: the authorization server redirects back with a code for the scopes asked."""
        params = dict(parse_qsl(urlsplit(url).query))
        self.authorizations.append(params)
        code = f"code-{len(self.authorizations)}"
        self._codes[code] = params.get("scope", "")
        return AuthorizationCodeResult(code=code, state=params["state"])

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        app = web.Application()
        app.router.add_get("/.well-known/oauth-authorization-server", self._metadata)
        app.router.add_post("/register", self._register)
        app.router.add_post("/token", self._token)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.url, "authorization_endpoint": f"{self.url}/authorize",
                                  "token_endpoint": f"{self.url}/token", "registration_endpoint": f"{self.url}/register",
                                  "response_types_supported": ["code"], "code_challenge_methods_supported": ["S256"],
                                  "grant_types_supported": ["authorization_code"]})

    async def _register(self, request: web.Request) -> web.Response:
        return web.json_response({**await request.json(), "client_id": "agent"}, status=201)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        scope = self._codes.pop(str(form.get("code")), None)
        if scope is None:
            return web.json_response({"error": "invalid_grant"}, status=400)
        token = self.issuer.token("alice", scope, alg="HS256")
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": 300, "scope": scope})


class MemoryStorage:
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def signing_in_client(registry: str, auth_server: AuthorizationServer, storage: MemoryStorage) -> Client:
    """The official SDK client with its OAuth flow: it signs in at whatever the gateway's challenge points to."""
    redirected: list[str] = []

    async def redirect(url: str) -> None:
        redirected.append(url)

    async def callback() -> AuthorizationCodeResult:
        return auth_server.authorize(redirected.pop())

    provider = OAuthClientProvider(
        f"{registry}/mcp", OAuthClientMetadata(redirect_uris=["http://127.0.0.1:1/callback"], client_name="agent"),
        storage, redirect_handler=redirect, callback_handler=callback)
    transport = streamable_http_client(f"{registry}/mcp", http_client=create_mcp_http_client(auth=provider))
    return Client(transport, mode="legacy")


@pytest.fixture
def protected(tmp_path):
    """An authorization server, and a registry with one server behind a sidecar that trusts it (echo needs
    `echo:call`); yields (registry URL, authorization server, a function starting another registry)."""

    @contextlib.contextmanager
    def stack(*registry_flags: str):
        with AuthorizationServer() as auth_server, \
                registry_process(tmp_path, secret=SECRET, extra=registry_flags) as registry, \
                toy_server(tmp_path, "alpha") as (_, upstream), \
                sidecar(["--upstream", upstream], tmp_path, "--server-name", "alpha", "--registry", registry,
                        "--policy", str(scoped_policy(tmp_path, auth_server.issuer, "alpha", "echo:call")),
                        env={"TOOLMESH_REGISTRY_SECRET": SECRET}):
            async def listed():
                return "alpha__echo" in {t["name"] for t in (await get_json(f"{registry}/v1/tools"))["tools"]}

            yield registry, auth_server, listed

    return stack


async def post_mcp(http: aiohttp.ClientSession, registry: str, message: dict[str, Any],
                   token: str | None = None, session: str | None = None) -> tuple[int, Mapping[str, str], Any]:
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               **({"Authorization": f"Bearer {token}"} if token else {}), **({"Mcp-Session-Id": session} if session else {})}
    async with http.post(f"{registry}/mcp", json=message, headers=headers) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}


async def test_the_gateway_answers_401_and_403_with_its_own_challenge_and_metadata(protected):
    with protected() as (registry, auth_server, listed):
        await async_wait_until(listed, timeout=20, what="alpha listed")
        metadata_url = f"{registry}/.well-known/oauth-protected-resource/mcp"
        async with aiohttp.ClientSession() as http:
            documents = []
            for url in (metadata_url, f"{registry}/.well-known/oauth-protected-resource"):
                async with http.get(url) as resp:
                    documents.append((resp.status, await resp.json(content_type=None) if resp.ok else None))
            call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                    "params": {"name": "alpha__echo", "arguments": {"message": "hi"}}}
            seen = {}
            for who, token in (("anonymous", None),
                               ("no scope", auth_server.issuer.token("bob", "other", alg="HS256")),
                               ("echo:call", auth_server.issuer.token("alice", "echo:call", alg="HS256"))):
                status, headers, _ = await post_mcp(http, registry, INITIALIZE, token)
                assert status == 200, who  # initialize never needs a token in the default mode
                status, headers, body = await post_mcp(http, registry, call, token, headers["Mcp-Session-Id"])
                seen[who] = (status, headers.get("WWW-Authenticate"), body.get("error", {}).get("code"))
    expected = {"resource": f"{registry}/mcp", "authorization_servers": [auth_server.url],
                "scopes_supported": ["echo:call", "mcp:admin"], "bearer_methods_supported": ["header"],
                "resource_name": "toolmesh gateway"}
    assert (documents, seen) == ([(200, expected), (200, expected)], {
        "anonymous": (401, f'Bearer resource_metadata="{metadata_url}"', -32003),
        "no scope": (403, f'Bearer resource_metadata="{metadata_url}", error="insufficient_scope", '
                          'error_description="this tool needs one of the scopes: echo:call", scope="echo:call"', -32004),
        "echo:call": (200, None, None)})


@pytest.mark.parametrize("require_token", [False, True])
async def test_an_sdk_client_signs_in_through_the_gateway(protected, require_token):
    with protected(*(["--require-token"] if require_token else [])) as (registry, auth_server, listed):
        await async_wait_until(listed, timeout=20, what="alpha listed")
        storage = MemoryStorage()
        async with signing_in_client(registry, auth_server, storage) as client:
            # --require-token: initialize itself got the 401, so the client signed in before its session opened.
            first = await answer(client.call_tool("alpha__echo", {"message": "signed in"}))
        # It found the gateway's metadata from the challenge, and asked the authorization server named there for
        # the gateway as resource and the scopes its metadata lists.
        (asked,) = auth_server.authorizations
        assert (asked["resource"], asked["scope"]) == (f"{registry}/mcp", "echo:call mcp:admin")
        assert storage.tokens is not None
        if require_token:
            assert first == "alpha:signed in"
        else:
            # The session was opened anonymously and belongs to no token: a new one, signed in, gets the call through.
            assert "unknown or ended session" in first
            async with signing_in_client(registry, auth_server, storage) as client:
                assert await answer(client.call_tool("alpha__echo", {"message": "again"})) == "alpha:again"


# -- 10. the registry's /metrics, and what /v1/tools' figures are ------------------------------------------------


async def get_text(url: str, token: str | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Authorization": f"Bearer {token}"} if token else {}) as resp:
            return resp.status, await resp.text()


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


async def test_the_registry_serves_prometheus_metrics_and_its_figures_agree(tmp_path):
    with registry_process(tmp_path, secret=SECRET) as registry, toy_server(tmp_path, "alpha") as (_, upstream), \
            sidecar(["--upstream", upstream], tmp_path, "--server-name", "alpha", "--registry", registry,
                    env={"TOOLMESH_REGISTRY_SECRET": SECRET, "OTEL_EXPORTER_OTLP_ENDPOINT": registry,
                         "OTEL_BSP_SCHEDULE_DELAY": "50"}):
        async def listed():
            return any(t["name"] == "alpha__echo" for t in (await get_json(f"{registry}/v1/tools"))["tools"])

        await async_wait_until(listed, timeout=20, what="alpha listed")
        async with gateway_client(registry) as client:
            for i in range(3):
                await client.call_tool("alpha__echo", {"message": str(i)})
            await failure(client.call_tool("nowhere__" + "x" * 50, {}))
            assert (await post_heartbeat(registry, {"server": "rogue", "endpoint": "http://127.0.0.1:1/mcp"},
                                         "wrong"))[0] == 401
            status, text = await get_text(f"{registry}/metrics", SECRET)
            refused_status, _ = await get_text(f"{registry}/metrics")
        assert (status, refused_status) == (200, 401)
        figures = samples(text)
        assert figures['toolmesh_gateway_calls_total{server="alpha",outcome="ok"}'] == 3
        assert figures['toolmesh_gateway_calls_total{server="_unknown",outcome="error"}'] == 1
        assert not any("nowhere" in name or "rogue" in name for name in figures)  # labels only from the catalogue
        assert figures["toolmesh_gateway_sessions_open"] == 1
        assert figures['toolmesh_registry_heartbeats_total{result="refused"}'] == 1
        assert figures['toolmesh_registry_heartbeats_total{result="accepted"}'] >= 1
        assert (figures["toolmesh_catalogue_servers"], figures["toolmesh_catalogue_tools"]) == (1, 1)

        async def agreed():
            listing = await get_json(f"{registry}/v1/tools")
            (tool,) = listing["tools"]
            return listing if (tool["stats"].get("count"), (tool["red"] or {}).get("totalCalls")) == (3, 3) else None

        # Heartbeat stats (since the sidecar started) and RED figures (traces since the registry started) agree
        # while both have run since the sidecar started; /v1/tools says what each is and why they can differ.
        listing = await async_wait_until(agreed, timeout=20, what="stats and red to count the same 3 calls")
        assert "since its sidecar started" in listing["figures"]["stats"]
        assert "empty after a registry restart" in listing["figures"]["red"]
