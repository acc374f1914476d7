"""The MCPToolPolicy model: defaults from the seed, strict validation naming the bad field, rule matching, loading."""

from __future__ import annotations

import pytest
from helpers import ROOT

from toolmesh.api.policy import (
    AuthorizationPolicy,
    BudgetPolicy,
    CachePolicy,
    CircuitBreakerPolicy,
    Jitter,
    LabelSelector,
    MCPToolPolicySpec,
    PolicyError,
    PolicyFile,
    RetryPolicy,
    RetryStrategy,
    match_tool_rule,
)

HMAC_ISSUER = {"issuer": "https://idp.example", "audiences": ["toolmesh"], "secret": "s3cret"}


def test_seed_defaults():
    retry = RetryPolicy()
    assert (retry.maxAttempts, retry.strategy, retry.baseDelayMs, retry.maxDelayMs, retry.jitter) == (
        3,
        RetryStrategy.exponential,
        1000,
        30000,
        Jitter.equal,
    )
    breaker = CircuitBreakerPolicy()
    assert (breaker.failureThreshold, breaker.openSeconds) == (5, 60)
    cache = CachePolicy()
    assert (cache.maxEntries, cache.ttlSeconds) == (1000, 300)
    budget = BudgetPolicy()
    assert (budget.resultFraction, budget.minAvailable, budget.reservedForResponse, budget.reservedForSystem) == (
        0.3,
        500,
        4096,
        2000,
    )
    assert AuthorizationPolicy().defaultScopes == ["mcp:admin"]


def test_empty_policy_switches_every_stage_off():
    spec = PolicyFile.parse({})
    assert spec == MCPToolPolicySpec()
    assert spec.auth is None and spec.rateLimit is None and spec.cache is None


def test_manifest_and_bare_spec_load_the_same():
    body = {"rateLimit": {"requestsPerSecond": 5}}
    manifest = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": "p"}, "spec": body}
    assert PolicyFile.parse(manifest) == PolicyFile.parse(body)


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"retry": {"maxAtempts": 3}}, "retry.maxAtempts"),
        ({"retry": {"strategy": "fibonacci"}}, "retry.strategy"),
        ({"budget": {"resultFraction": 1.5}}, "budget.resultFraction"),
        ({"auth": {"issuers": [{**HMAC_ISSUER, "jwksUrl": "https://idp/jwks"}]}}, "auth.issuers[0]"),
        ({"auth": {"issuers": [{**HMAC_ISSUER, "algorithms": ["RS256"]}]}}, "auth.issuers[0]"),
        ({"auth": {"issuers": [{**HMAC_ISSUER, "audiences": []}]}}, "auth.issuers[0].audiences"),
        ({"auth": {"issuers": []}}, "auth.issuers"),
        ({"authorization": {"rules": []}}, "(document)"),
        ({"auth": {"issuers": [HMAC_ISSUER]}, "authorization": {"rules": [{"tools": [], "scopes": ["a"]}]}},
         "authorization.rules[0].tools"),
        ({"auth": {"issuers": [HMAC_ISSUER]}, "authorization": {"rules": [{"tools": ["x"], "scopes": ["a b"]}]}},
         "authorization.rules[0].scopes"),
        ({"timeouts": {"callSeconds": 100, "maxSeconds": 10}}, "timeouts"),
    ],
)  # fmt: skip
def test_invalid_policy_names_the_field(document, field):
    with pytest.raises(PolicyError) as err:
        PolicyFile.parse(document, source="policy.yaml")
    assert field in err.value.fields
    assert str(err.value).startswith("policy.yaml: ")
    assert field in str(err.value)


def test_manifest_errors_are_prefixed_with_spec():
    with pytest.raises(PolicyError) as err:
        PolicyFile.parse({"kind": "MCPToolPolicy", "spec": {"cache": {"maxEntries": 0}}})
    assert "spec.cache.maxEntries" in err.value.fields


def test_bad_yaml_and_missing_file_are_policy_errors(tmp_path):
    with pytest.raises(PolicyError, match="not valid YAML"):
        PolicyFile.loads("auth: [", source="x.yaml")
    with pytest.raises(PolicyError, match="cannot read policy file"):
        PolicyFile.load(tmp_path / "absent.yaml")
    with pytest.raises(PolicyError, match="must be a mapping"):
        PolicyFile.loads("- a\n- b\n")


def test_first_matching_rule_wins_with_globs():
    spec = PolicyFile.parse(
        {
            "auth": {"issuers": [HMAC_ISSUER]},
            "authorization": {
                "rules": [
                    {"tools": ["query_secret"], "scopes": ["db:admin"]},
                    {"tools": ["query_*", "search_*"], "scopes": ["db:read", "admin"]},
                    {"tools": ["public"], "scopes": []},
                ],
                "defaultScopes": ["root"],
            },
        }
    )
    authz = spec.authorization
    assert authz.tool_scopes("query_secret") == ["db:admin"]
    assert authz.tool_scopes("query_users") == ["db:read", "admin"]
    assert authz.tool_scopes("search_code") == ["db:read", "admin"]
    assert authz.tool_scopes("public") == []
    assert authz.tool_scopes("deploy") == ["root"]
    assert match_tool_rule(authz.rules, "Query_users") is None  # tool names are case-sensitive
    assert authz.all_scopes() == ["db:admin", "db:read", "admin", "root"]


def test_issuer_algorithm_defaults_follow_the_key_kind(tmp_path, monkeypatch):
    spec = PolicyFile.parse(
        {
            "auth": {
                "issuers": [
                    HMAC_ISSUER,
                    {"issuer": "b", "audiences": ["x"], "jwksUrl": "http://127.0.0.1:1/jwks"},
                    {"issuer": "c", "audiences": ["x"], "secretEnv": "TOOLMESH_TEST_SECRET"},
                    {"issuer": "d", "audiences": ["x"], "secretFile": str(tmp_path / "secret")},
                ]
            }
        }
    )
    hmac, jwks, env, file = spec.auth.issuers
    assert hmac.allowed_algorithms == ["HS256"]
    assert jwks.allowed_algorithms == ["RS256", "ES256"]
    assert hmac.resolve_secret() == b"s3cret"
    monkeypatch.setenv("TOOLMESH_TEST_SECRET", "from-env")
    assert env.resolve_secret() == b"from-env"
    (tmp_path / "secret").write_text("from-file\n")
    assert file.resolve_secret() == b"from-file"
    monkeypatch.delenv("TOOLMESH_TEST_SECRET")
    with pytest.raises(PolicyError, match="TOOLMESH_TEST_SECRET"):
        env.resolve_secret()


def test_label_selector():
    selector = LabelSelector.model_validate(
        {"matchLabels": {"team": "a"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["db"]}]}
    )
    assert selector.matches({"team": "a", "tier": "db"})
    assert not selector.matches({"team": "a", "tier": "web"})
    assert not selector.matches({"tier": "db"})
    assert LabelSelector().matches({})


def test_every_field_is_documented_with_its_default():
    seen = set()

    def walk(model):
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no docstring"
            annotation = info.annotation
            for sub in getattr(annotation, "__args__", ()) + (annotation,):
                if isinstance(sub, type) and hasattr(sub, "model_fields"):
                    walk(sub)
                for inner in getattr(sub, "__args__", ()):
                    if isinstance(inner, type) and hasattr(inner, "model_fields"):
                        walk(inner)

    walk(MCPToolPolicySpec)
    assert len(seen) > 15


def test_model_is_frozen():
    spec = PolicyFile.parse({"rateLimit": {}})
    with pytest.raises(Exception):
        spec.rateLimit.burst = 1  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_load(path):
    spec = PolicyFile.load(path)
    assert spec != MCPToolPolicySpec(), f"{path.name} sets nothing"


# --- loading from files and watching them -----------------------------------------------------

from toolmesh.sidecar.control.policy_source import PolicyWatcher, load_policy  # noqa: E402


def configmap_dir(root, version: str, text: str):
    """Lay out a directory as the kubelet mounts a ConfigMap: policy.yaml → ..data/policy.yaml, ..data → ..<version>."""
    import os

    data = root / f"..{version}"
    data.mkdir()
    (data / "policy.yaml").write_text(text)
    tmp_link = root / "..data_tmp"
    os.symlink(data.name, tmp_link)
    os.replace(tmp_link, root / "..data")  # the atomic swap the kubelet does
    if not (root / "policy.yaml").is_symlink():
        os.symlink("..data/policy.yaml", root / "policy.yaml")


def test_load_policy_from_a_file_or_a_configmap_directory(tmp_path):
    (tmp_path / "p.yaml").write_text("rateLimit: {burst: 3}\n")
    assert load_policy(tmp_path / "p.yaml").rateLimit.burst == 3
    mount = tmp_path / "mount"
    mount.mkdir()
    configmap_dir(mount, "v1", "rateLimit: {burst: 4}\n")
    assert load_policy(mount).rateLimit.burst == 4
    with pytest.raises(PolicyError) as err:
        load_policy(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(err.value)


async def test_watcher_swaps_valid_policies_and_ignores_invalid_ones(tmp_path, caplog):
    path = tmp_path / "policy.yaml"
    path.write_text("rateLimit: {burst: 1}\n")
    installed = []
    watcher = PolicyWatcher(path, installed.append, interval=0.01)
    assert watcher.current.rateLimit.burst == 1
    assert not await watcher.check()

    path.write_text("rateLimit: {burst: 2}\n")
    assert await watcher.check()
    assert watcher.current.rateLimit.burst == 2 and installed[-1].rateLimit.burst == 2

    path.write_text("rateLimit: {burst: 0}\n")
    assert not await watcher.check()
    assert watcher.current.rateLimit.burst == 2 and watcher.rejected == 1
    assert "rateLimit.burst" in watcher.last_error and "policy.yaml" in watcher.last_error
    assert "ignoring the new policy" in caplog.text

    path.unlink()  # a file briefly missing keeps the policy too
    assert not await watcher.check()
    path.write_text("rateLimit: {burst: 5}\n")
    assert await watcher.check() and watcher.current.rateLimit.burst == 5


async def test_watcher_follows_a_configmap_symlink_swap(tmp_path):
    configmap_dir(tmp_path, "v1", "rateLimit: {burst: 1}\n")
    watcher = PolicyWatcher(tmp_path, interval=0.01)
    configmap_dir(tmp_path, "v2", "rateLimit: {burst: 9}\n")
    assert await watcher.check()
    assert watcher.current.rateLimit.burst == 9


async def test_a_policy_the_installer_refuses_is_not_swapped_in(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("rateLimit: {burst: 1}\n")

    def install(policy):
        if policy.rateLimit.burst == 7:
            raise PolicyError("secret missing")

    watcher = PolicyWatcher(path, install)
    path.write_text("rateLimit: {burst: 7}\n")
    assert not await watcher.check()
    assert watcher.current.rateLimit.burst == 1 and watcher.last_error == "secret missing"


async def test_background_polling_notices_a_change(tmp_path):
    import asyncio

    from helpers import async_wait_until

    path = tmp_path / "policy.yaml"
    path.write_text("rateLimit: {burst: 1}\n")
    watcher = PolicyWatcher(path, interval=0.01)
    watcher.start()
    try:
        path.write_text("rateLimit: {burst: 3}\n")

        async def swapped():
            return watcher.current.rateLimit.burst == 3

        await async_wait_until(swapped, timeout=5, what="the watcher to swap the policy")
    finally:
        await watcher.stop()
    assert watcher._task is None
    await asyncio.sleep(0)
