"""Session bindings: any two principals, any interleaving of session operations, never act on each other's sessions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from toolmesh.api.sessions import (
    ANONYMOUS,
    SessionBindings,
    credential_principal,
    session_ref,
    unguessable_id,
    verified_principal,
)

PRINCIPALS = ["alice", "bob", ANONYMOUS]
SESSIONS = ["s1", "s2", "s3"]
operations = st.lists(st.tuples(st.sampled_from(["open", "use", "end"]), st.sampled_from(PRINCIPALS),
                                st.sampled_from(SESSIONS)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(min_value=1, max_value=4))
def test_no_interleaving_lets_one_principal_use_anothers_session(ops, cap):
    bindings = SessionBindings(max_sessions=cap)
    opened_by: dict[str, str] = {}
    for op, principal, session in ops:
        if op == "open" and bindings.owner(session) is None:
            # New, or forgotten (ended or evicted): whoever opens it now owns it.
            bindings.bind(session, principal)
            opened_by[session] = principal
        elif op == "open":
            bindings.bind(session, principal)  # a second principal re-binding must change nothing
        elif op == "use":
            admitted = bindings.admits(session, principal)
            if admitted:
                assert opened_by.get(session) == principal
        elif op == "end" and bindings.owner(session) == principal:
            bindings.forget(session)
            opened_by.pop(session, None)
        for known in SESSIONS:
            owner = bindings.owner(known)
            assert owner is None or owner == opened_by.get(known)
        assert len(bindings) <= cap
        assert sum(bindings.count(p) for p in PRINCIPALS) == len(bindings)


def test_eviction_forgets_the_least_recently_used_and_never_admits_another():
    bindings = SessionBindings(max_sessions=2)
    bindings.bind("a", "alice")
    bindings.bind("b", "bob")
    assert bindings.admits("a", "alice")  # a is now the most recently used
    bindings.bind("c", "carol")
    assert bindings.owner("b") is None
    assert not bindings.admits("b", "bob")
    assert not bindings.admits("a", "carol")
    assert bindings.admits("a", "alice")


def test_principals_of_credentials_and_verified_tokens():
    assert credential_principal(None) == ANONYMOUS == credential_principal("")
    assert credential_principal("Bearer x") != credential_principal("Bearer y")
    assert "Bearer x" not in credential_principal("Bearer x")
    assert verified_principal("https://a", "u") != verified_principal("https://b", "u")
    assert verified_principal(None, "u") != verified_principal("u", "")


def test_session_ref_is_stable_short_and_not_the_id():
    session_id = unguessable_id()
    assert len(session_id) >= 22 and unguessable_id() != session_id
    assert session_ref(session_id) == session_ref(session_id)
    assert len(session_ref(session_id)) == 16 and session_id not in session_ref(session_id)
    assert session_ref(None) is None
