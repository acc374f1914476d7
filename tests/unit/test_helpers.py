"""The test helpers themselves: a port is free, a wait fails on a false condition, a server that dies is reported."""

import sys

import pytest

from helpers import free_port, listening, port_open, wait_until


def test_free_port_is_closed():
    assert not port_open(free_port())


def test_wait_until_fails_with_the_condition_named():
    with pytest.raises(AssertionError, match="the impossible"):
        wait_until(lambda: False, timeout=0.1, what="the impossible")


def test_listening_fails_with_the_log_of_a_process_that_exits_at_start_up(tmp_path):
    script = "import sys; print('cannot bind'); sys.exit(3)"
    with pytest.raises(AssertionError, match=r"(?s)toy exited at start-up.*cannot bind"):
        with listening([sys.executable, "-c", script], free_port(), what="toy", log_path=tmp_path / "toy.log"):
            pass


def test_listening_yields_once_the_port_accepts(tmp_path):
    port = free_port()
    script = f"import http.server as s; s.HTTPServer(('127.0.0.1', {port}), s.BaseHTTPRequestHandler).serve_forever()"
    with listening([sys.executable, "-c", script], port, what="toy") as proc:
        assert proc.poll() is None and port_open(port)
