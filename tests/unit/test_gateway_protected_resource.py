"""The gateway's OAuth face: its challenge keeps what the sidecar said but points at the gateway, and no header
value from a heartbeat or a sidecar can break it."""

import pytest

from toolmesh.registry.protected_resource import CallerAuth, challenge, challenge_params, metadata_document


def test_a_sidecars_challenge_is_re_pointed_at_the_gateway_keeping_error_and_scope():
    sidecar = ('Bearer resource_metadata="http://10.0.0.5:7400/.well-known/oauth-protected-resource", '
               'error="insufficient_scope", error_description="needs \\"echo:call\\"", scope="echo:call"')
    params = challenge_params(sidecar)
    assert params == {"error": "insufficient_scope", "error_description": 'needs "echo:call"', "scope": "echo:call"}
    assert challenge("https://tools.example.com/mcp", params) == (
        'Bearer resource_metadata="https://tools.example.com/.well-known/oauth-protected-resource/mcp", '
        'error="insufficient_scope", error_description="needs \\"echo:call\\"", scope="echo:call"')


def test_nothing_outside_printable_ascii_reaches_the_header():
    assert challenge("http://gw/mcp", {"error_description": "a\r\nSet-Cookie: x=1\x00é"}) == (
        'Bearer resource_metadata="http://gw/.well-known/oauth-protected-resource/mcp", '
        'error_description="aSet-Cookie: x=1"')


def test_metadata_is_the_union_of_the_servers_and_malformed_beats_are_refused():
    a = CallerAuth.from_beat({"required": True, "authorizationServers": ["https://a", "https://b"],
                              "scopesSupported": ["x", "y"]})
    b = CallerAuth.from_beat({"required": False, "authorizationServers": ["https://b", "https://c"],
                              "scopesSupported": ["y", "z"]})
    document = metadata_document("http://gw/mcp", [a, b])
    assert (document["authorization_servers"], document["scopes_supported"]) == (
        ["https://a", "https://b", "https://c"], ["x", "y", "z"])
    assert CallerAuth.from_beat(None) is None
    for bad in ("yes", {"authorizationServers": "https://a"}, {"scopesSupported": [1]}):
        with pytest.raises(ValueError):
            CallerAuth.from_beat(bad)
