"""spec.imagePullPolicy reaches the server container; the toolmesh image is pulled as the sidecar is."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from toolmesh.api.server import MCPServerSpec
from toolmesh.operator.render import OperatorConfig, server_container

CONFIG = OperatorConfig(sidecar_image="toolmesh:dev")


@pytest.mark.parametrize("policy", ["Always", "IfNotPresent", "Never"])
def test_a_named_pull_policy_is_rendered(policy):
    spec = MCPServerSpec(image="docker.io/mcp/everything:latest", imagePullPolicy=policy)
    assert server_container(spec, CONFIG)["imagePullPolicy"] == policy


def test_without_a_pull_policy_kubernetes_decides():
    container = server_container(MCPServerSpec(image="docker.io/mcp/everything:latest"), CONFIG)
    assert "imagePullPolicy" not in container


def test_a_command_only_server_runs_the_toolmesh_image_if_not_present():
    container = server_container(MCPServerSpec(transport="stdio", command=["mcp-server-time"]), CONFIG)
    assert container["image"] == "toolmesh:dev" and container["imagePullPolicy"] == "IfNotPresent"


def test_an_unknown_pull_policy_is_refused():
    with pytest.raises(ValidationError, match="imagePullPolicy"):
        MCPServerSpec(image="x", imagePullPolicy="Sometimes")
