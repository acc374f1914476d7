"""The test helpers themselves: a port is free, a wait fails on a false condition."""

import pytest

from helpers import free_port, port_open, wait_until


def test_free_port_is_closed():
    assert not port_open(free_port())


def test_wait_until_fails_with_the_condition_named():
    with pytest.raises(AssertionError, match="the impossible"):
        wait_until(lambda: False, timeout=0.1, what="the impossible")
