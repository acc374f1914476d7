"""An invalid policy edit never loosens a server: the last accepted spec stays in force, and the server is told."""

from __future__ import annotations

from toolmesh.operator.merge import PolicySource, merge_policies

AUTH = {"issuers": [{"issuer": "https://idp", "audiences": ["mcp"], "secret": "s3cret"}]}
TWO_SAME_ISSUERS = {"issuers": [{"issuer": "https://idp", "audiences": ["mcp"], "secret": "a"},
                                {"issuer": "https://idp", "audiences": ["mcp"], "secret": "b"}]}


def body(name: str, spec: dict, generation: int = 1, accepted: dict | None = None, accepted_generation: int = 1):
    status = {"acceptedSpec": accepted, "acceptedGeneration": accepted_generation} if accepted is not None else {}
    return {"metadata": {"name": name, "generation": generation}, "spec": spec, "status": status}


def test_an_invalid_edit_keeps_the_last_accepted_spec_in_force():
    accepted = {"auth": AUTH, "timeouts": {"callSeconds": 10, "maxSeconds": 60}}
    edited = PolicySource.from_body(body("strict", {"auth": TWO_SAME_ISSUERS}, generation=2, accepted=accepted))
    assert not edited.valid and "spec.auth" in edited.error
    merged = merge_policies([edited], {})
    assert merged.error is None
    assert merged.spec == accepted, "the sidecar keeps authenticating"
    assert merged.winners == {"auth": "strict", "timeouts": "strict"}
    ok, reason, message = merged.describe()
    assert (ok, reason) == (False, "InvalidPolicy")
    assert "strict generation 2 is invalid" in message and "generation 1 stays in force" in message
    assert "spec.auth" in message


def test_a_bad_timeouts_value_keeps_the_accepted_timeouts():
    accepted = {"timeouts": {"callSeconds": 10, "maxSeconds": 60}}
    edited = PolicySource.from_body(body("t", {"timeouts": {"callSeconds": 100, "maxSeconds": 60}}, 3, accepted, 2))
    merged = merge_policies([edited], {})
    assert merged.spec == accepted and "spec.timeouts" in merged.invalid["t"]


def test_the_accepted_selector_decides_where_the_old_spec_applies():
    accepted = {"selector": {"matchLabels": {"team": "a"}}, "auth": AUTH}
    edited = PolicySource.from_body(body("p", {"selector": {"matchLabels": {"team": "b"}}, "auth": TWO_SAME_ISSUERS},
                                         2, accepted))
    assert merge_policies([edited], {"team": "a"}).spec == {"auth": AUTH}
    on_b = merge_policies([edited], {"team": "b"})
    assert on_b.spec == {} and "p" in on_b.invalid, "the server the edit meant is told, not silently open"
    assert merge_policies([edited], {"team": "c"}).invalid == {}


def test_a_policy_never_accepted_is_named_not_silent():
    never = PolicySource.from_body(body("never", {"auth": TWO_SAME_ISSUERS}))
    merged = merge_policies([never], {})
    ok, reason, message = merged.describe()
    assert (ok, reason) == (False, "InvalidPolicy"), "never NoPolicy / observability only"
    assert "never" in message and "no generation of it was ever accepted" in message and "spec.auth" in message


def test_an_accepted_spec_the_model_no_longer_parses_is_not_enforced_but_named():
    edited = PolicySource.from_body(body("p", {"auth": TWO_SAME_ISSUERS}, 2, accepted={"auth": TWO_SAME_ISSUERS}))
    assert edited.accepted is None
    assert "p" in merge_policies([edited], {}).invalid


def test_precedence_of_an_invalid_policy_is_its_accepted_one():
    accepted = {"precedence": 5, "cache": {"ttlSeconds": 1}}
    edited = PolicySource.from_body(body("hi", {"precedence": 500, "cache": {"ttlSeconds": -1}}, 2, accepted))
    other = PolicySource.from_body(body("mid", {"precedence": 10, "cache": {"ttlSeconds": 2}}))
    assert merge_policies([edited, other], {}).winners["cache"] == "mid"


def test_the_applied_message_says_which_policy_won_which_section():
    a = PolicySource.from_body(body("a", {"auth": AUTH, "cache": {"ttlSeconds": 1}}))
    b = PolicySource.from_body(body("b", {"precedence": 1, "cache": {"ttlSeconds": 2}}))
    ok, reason, message = merge_policies([a, b], {}, inline={"retry": {"maxAttempts": 2}}).describe()
    assert (ok, reason) == (True, "Merged")
    assert message == "merged from (inline), a, b: auth from a; cache from b; retry from (inline)"
    assert merge_policies([], {}).describe() == (True, "NoPolicy", "no policy selects this server: observability only")
