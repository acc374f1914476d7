"""Policy precedence: which policies apply to a server and which one wins each section."""

from __future__ import annotations

from toolmesh.api.policy import PolicyFile
from toolmesh.operator.merge import INLINE, PolicySource, merge_policies, rank


def policy(name: str, **spec) -> PolicySource:
    return PolicySource.from_body({"metadata": {"name": name}, "spec": spec})


def test_higher_precedence_wins_a_section_whole():
    low = policy("low", cache={"ttlSeconds": 10, "maxEntries": 5})
    high = policy("high", precedence=5, cache={"ttlSeconds": 99})
    merged = merge_policies([high, low], {})
    assert merged.spec == {"cache": {"ttlSeconds": 99}}
    assert merged.winners == {"cache": "high"} and merged.applied == ["low", "high"]


def test_sections_from_different_policies_combine():
    merged = merge_policies([policy("a", cache={"ttlSeconds": 1}), policy("b", retry={"maxAttempts": 2})], {})
    assert merged.spec == {"cache": {"ttlSeconds": 1}, "retry": {"maxAttempts": 2}} and merged.error is None


def test_ties_go_to_the_name_sorting_first():
    merged = merge_policies([policy("zeta", cache={"ttlSeconds": 1}), policy("alpha", cache={"ttlSeconds": 2})], {})
    assert merged.winners["cache"] == "alpha" and merged.spec["cache"] == {"ttlSeconds": 2}
    assert [p.name for p in rank([policy("b"), policy("a"), policy("c", precedence=-1)])] == ["c", "b", "a"]


def test_inline_policy_ranks_below_every_policy():
    merged = merge_policies([policy("p", precedence=-100, cache={"ttlSeconds": 1})], {},
                            inline={"cache": {"ttlSeconds": 7}, "budget": {"totalTokens": 50000}})
    assert merged.winners == {"budget": INLINE, "cache": "p"} and merged.applied == [INLINE, "p"]


def test_selectors_pick_servers_by_label():
    labelled = policy("labelled", selector={"matchLabels": {"team": "a"}}, cache={})
    expr = policy("expr", selector={"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["dev"]}]},
                  retry={})
    assert merge_policies([labelled, expr], {"team": "a", "tier": "prod"}).applied == ["labelled", "expr"]
    assert merge_policies([labelled, expr], {"team": "b", "tier": "dev"}).applied == []
    assert merge_policies([policy("all", audit={})], {"anything": "x"}).applied == ["all"]


def test_invalid_policy_is_reported_and_never_applied():
    broken = policy("broken", precedence=100, retry={"maxAttempts": 0})
    assert not broken.valid and "spec.retry.maxAttempts" in broken.error
    merged = merge_policies([broken, policy("ok", retry={"maxAttempts": 2})], {})
    assert merged.spec == {"retry": {"maxAttempts": 2}} and merged.applied == ["ok"]


def test_unknown_field_names_the_field():
    broken = policy("typo", cach={"ttlSeconds": 1})
    assert "spec.cach" in broken.error


def test_merged_result_is_validated_as_a_whole():
    # The inline policy is not checked on its own; the merge catches an authorization nobody authenticates.
    merged = merge_policies([policy("c", cache={})], {}, inline={"authorization": {"defaultScopes": ["x"]}})
    assert merged.error is not None and "authorization needs auth" in merged.error


def test_merged_spec_loads_in_the_sidecar_policy_reader():
    merged = merge_policies([policy("a", cache={"ttlSeconds": 3}), policy("b", precedence=1, budget={})], {})
    loaded = PolicyFile.parse({"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPToolPolicy", "spec": merged.spec})
    assert loaded.cache.ttlSeconds == 3 and loaded.budget is not None
