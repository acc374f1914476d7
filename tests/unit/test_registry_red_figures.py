"""RED figures from spans anyone may post: kept only for tools the catalogue serves, so made-up names cost nothing."""

from __future__ import annotations

from toolmesh.registry.app import CATALOGUE, TRACES, create_app
from toolmesh.registry.settings import RegistrySettings
from toolmesh.registry.traces import ToolCallSpan


def test_spans_of_tools_outside_the_catalogue_are_not_kept():
    app = create_app(RegistrySettings())
    app[CATALOGUE].heartbeat({"server": "alpha", "instance": "alpha-0", "endpoint": "http://127.0.0.1:1/mcp",
                              "tools": [{"name": "echo", "inputSchema": {"type": "object"}}]})
    red = app[TRACES].red
    red.record(ToolCallSpan("alpha", "echo", 2.0, False))
    for n in range(5000):
        red.record(ToolCallSpan("alpha", f"made-up-{n}", 1.0, False))
        red.record(ToolCallSpan(f"nobody-{n}", "echo", 1.0, True))
    assert len(red) == 1
    assert red.figures("alpha", "echo")["calls"] == 1
    assert red.figures("alpha", "made-up-1") is None
