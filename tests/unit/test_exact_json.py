"""JSON read and written by toolmesh keeps every integer exact, whatever its size."""

from __future__ import annotations

import json

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from toolmesh.api.jsonrpc import dumps, loads

documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(documents)
def test_any_document_round_trips_with_exact_integers(document):
    text = json.dumps(document).encode()
    assert loads(text) == json.loads(text)
    assert loads(dumps(document)) == document


def test_integers_beyond_64_bits_are_not_read_as_floats():
    wide = 2**70 + 1
    assert orjson.loads(f"[{wide}]")[0] != wide  # why loads exists
    assert loads(f'{{"a": {wide}, "b": "x"}}'.encode()) == {"a": wide, "b": "x"}
    assert loads(f'[{-wide}]') == [-wide]
    assert dumps({"a": wide}) == f'{{"a":{wide}}}'.encode()
    assert dumps({"b": 1, "a": wide}, sort_keys=True) == f'{{"a":{wide},"b":1}}'.encode()


def test_twenty_digits_inside_a_string_change_nothing():
    body = b'{"id":"12345678901234567890123","n":1.5}'
    assert loads(body) == {"id": "12345678901234567890123", "n": 1.5}
