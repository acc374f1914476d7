"""What the operator and the chart tell a container to run goes through that command's real argument parser.

A renamed or removed flag in `toolmesh sidecar|registry|operator` fails here, not in a pod's CrashLoopBackOff.
"""

from __future__ import annotations

import pytest

from helpers.chart import find, objects, template
from toolmesh.cli import build_parser
from toolmesh.operator.inject import SidecarOptions, sidecar_args


def parse(args: list[str]):
    return build_parser(args[0]).parse_args(args)


@pytest.mark.parametrize("transport", ["streamable-http", "sse", "stdio"])
@pytest.mark.parametrize("with_policy", [True, False])
@pytest.mark.parametrize("registry", ["http://toolmesh-registry.toolmesh-system.svc:7401", None])
def test_the_rendered_sidecar_arguments_parse(transport, with_policy, registry):
    options = SidecarOptions(image="toolmesh:dev", server_name="time", transport=transport, upstream_port=3001,
                             upstream_path="/sse" if transport == "sse" else "/mcp",
                             policy_configmap="time-policy" if with_policy else None, registry_url=registry)
    args = parse(sidecar_args(options))
    assert args.command == "sidecar" and args.listen == "0.0.0.0:7400" and args.server_name == "time"
    if transport == "stdio":
        assert args.upstream_fifo_dir and not args.upstream
    else:
        assert args.upstream == options.upstream_url
        assert args.upstream_transport == ("sse" if transport == "sse" else "streamable-http")
    assert bool(args.policy) is with_policy and args.registry == registry


@pytest.mark.parametrize("values", [[], ["--set", "webhook.enabled=false"], ["--set", "operator.watchNamespaces={a,b}"], ["--set", "operator.namespaceSelector.team=a"],
                                    ["--set", "sidecar.reportToRegistry=false"]])
def test_the_charts_container_arguments_parse(values):
    docs = objects(template(*values).stdout)
    deployments = {d["metadata"]["name"]: d for d in find(docs, "Deployment")}
    for name, command in (("toolmesh-operator", "operator"), ("toolmesh-registry", "registry")):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        assert args[0] == command, args
        parsed = parse(args)
        assert parsed.command == command
