"""Fixtures the integration tests share: upstreams that several modules run the same way."""

from __future__ import annotations

import pytest

from helpers.fault_upstream import fault_upstream


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """The SDK fixture server behind a fault-injecting relay, one per test module; its `url` is the upstream."""
    with fault_upstream(tmp_path_factory.mktemp("faulty")) as relay:
        yield relay
