"""Resource URIs as the rules see them: one normal form, ambiguous ones refused, and globs where `*` stays in a segment."""

from __future__ import annotations

import pytest

from toolmesh.api.policy import AmbiguousUri, PolicyError, PolicyFile, normalise_resource_uri, resource_glob

PUBLIC_ONLY = {
    "auth": {"issuers": [{"issuer": "i", "audiences": ["a"], "secret": "s" * 32}]},
    "authorization": {"resourceRules": [{"resources": ["file:///public/*"], "scopes": ["public"]}]},
}


@pytest.mark.parametrize("uri", [
    "file:///public/../secret/key",
    "file:///public/%2e%2e/secret/key",
    "file:///public/%2E%2E/secret/key",
    "file:///public/.%2e/secret/key",
    "file:///public/..%2fsecret",
    "file:///public/..%2Fsecret",
    "file:///public/..%5csecret",
    "file:///public/./../secret",
    "file:///public//../../secret",
    "file:///public/.",
    "file:///public/..",
    "file:///public/..;/secret",
    "file:///public/x?/../../secret",
    "file:///public/..\\secret",
    "file:///public/x\x00",
    "file:///public/x%00",
    "file:///public/x%0d%0a",
    "file:///public/x\r\nHost: evil",
    "file:///public/%252e%252e/secret",
    "file:///public/%C0%AE%C0%AE/secret",
    "file:///public/%zz",
    "file:///public/%2",
    "file:////secret/key",
    "file:///public//x",
    "https://ex%61mple.com/public/x",
])
def test_ambiguous_uris_are_refused(uri):
    with pytest.raises(AmbiguousUri):
        normalise_resource_uri(uri)


@pytest.mark.parametrize(("uri", "normal"), [
    ("file:///public/readme.md", "file:///public/readme.md"),
    ("FILE:///public/readme.md", "file:///public/readme.md"),
    ("file://LOCALHOST/public/x", "file:///public/x"),
    ("file:/public/x", "file:///public/x"),
    ("file:///public/%7euser/%41", "file:///public/~user/A"),
    ("file:///public/a%3fb", "file:///public/a%3Fb"),
    ("HTTPS://Docs.Example.COM:443/Guide", "https://docs.example.com/Guide"),
    ("http://Docs.Example.COM:8080/Guide", "http://docs.example.com:8080/Guide"),
    ("https://e.com/caf%c3%a9", "https://e.com/caf%C3%A9"),
    ("file:///public/.hidden/a..b", "file:///public/.hidden/a..b"),
    ("file:///public/", "file:///public/"),
    ("urn:isbn:0451450523", "urn:isbn:0451450523"),
    ("db://orders/{id}", "db://orders/{id}"),
])
def test_normal_form(uri, normal):
    assert normalise_resource_uri(uri) == normal
    assert normalise_resource_uri(normal) == normal


@pytest.mark.parametrize(("pattern", "uri", "matches"), [
    ("file:///public/*", "file:///public/readme.md", True),
    ("file:///public/*", "file:///public/a/b.md", False),
    ("file:///public/*", "file:///secret/key", False),
    ("file:///public/**", "file:///public/a/b.md", True),
    ("file:///public/**", "file:///public", False),
    ("file:///**/*.md", "file:///x.md", True),
    ("file:///**/*.md", "file:///a/b/x.md", True),
    ("file:///**/*.md", "file:///a/b/x.txt", False),
    ("file:///public/?.md", "file:///public/a.md", True),
    ("file:///public/?", "file:///public/ab", False),
    ("file:///public/[ab].md", "file:///public/a.md", True),
    ("file:///public/[!ab].md", "file:///public/a.md", False),
    ("file:///public/[!ab]", "file:///public/c", True),
    ("**", "file:///anything/at/all", True),
    ("*", "file:///anything", False),
    ("FILE:///public/*", "file:///public/x", True),
    ("file:///public/%7e*", "file:///public/~me", True),
])
def test_star_stays_in_a_segment_and_double_star_crosses(pattern, uri, matches):
    assert bool(resource_glob(pattern).match(normalise_resource_uri(uri))) is matches


@pytest.mark.parametrize("uri", [
    "file:///public/../secret/key", "file:///public/%2e%2e/secret/key", "file:///public/..%2fsecret",
    "file:///public/./../secret", "file:///public//../../secret",
])
def test_the_policy_never_answers_for_an_ambiguous_uri(uri):
    authorization = PolicyFile.parse(PUBLIC_ONLY).authorization
    assert authorization.resource_scopes("file:///public/readme.md") == ["public"]
    assert authorization.resource_scopes("file:///public/a/b") == ["mcp:admin"]
    with pytest.raises(AmbiguousUri):
        authorization.resource_scopes(uri)


@pytest.mark.parametrize("pattern", ["file:///public/../x/*", "file:///a//b/*", "file:///%2f/*", "file:///x\\*"])
def test_a_glob_that_could_never_match_is_a_policy_error(pattern):
    policy = {**PUBLIC_ONLY, "authorization": {"resourceRules": [{"resources": [pattern], "scopes": []}]}}
    with pytest.raises(PolicyError, match=r"authorization\.resourceRules\[0\]\.resources"):
        PolicyFile.parse(policy)
