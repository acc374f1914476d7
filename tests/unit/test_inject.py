"""Sidecar injection: what a pod gets, that a second injection adds nothing, and what annotations may ask."""

from __future__ import annotations

import pytest

from toolmesh.operator.inject import (
    SIDECAR_NAME, InjectionError, SidecarOptions, inject_pod, is_injected, options_from_pod, sidecar_args,
)


def pod(annotations=None, labels=None, **spec):
    return {"metadata": {"name": "p", "annotations": annotations or {}, "labels": labels or {}},
            "spec": {"containers": [{"name": "app", "image": "x"}], **spec}}


OPTIONS = SidecarOptions(image="img", server_name="calc", policy_configmap="calc-policy", registry_url="http://r:7401")


def test_injection_adds_a_native_sidecar_with_volumes_and_probes():
    out = inject_pod(pod(), OPTIONS)
    sidecar = out["spec"]["initContainers"][0]
    assert sidecar["name"] == SIDECAR_NAME and sidecar["restartPolicy"] == "Always"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["resources"]["requests"] and sidecar["resources"]["limits"]
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["toolmesh-policy"]["configMap"]["name"] == "calc-policy"
    token = volumes["toolmesh-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "toolmesh-registry"
    assert out["spec"]["containers"] == [{"name": "app", "image": "x"}], "the app container is left alone"
    assert out["metadata"]["annotations"]["toolmesh.io/injected"] == "true"


def test_injection_is_idempotent_and_does_not_mutate_its_input():
    original = pod(initContainers=[{"name": "setup", "image": "y"}])
    once = inject_pod(original, OPTIONS)
    assert "initContainers" in original["spec"] and len(original["spec"]["initContainers"]) == 1
    assert inject_pod(once, OPTIONS) == once and is_injected(once)
    assert [c["name"] for c in once["spec"]["initContainers"]] == [SIDECAR_NAME, "setup"]


def test_annotations_choose_port_path_transport_and_policy():
    options = options_from_pod(pod({"toolmesh.io/upstream-port": "3000", "toolmesh.io/transport": "sse",
                                    "toolmesh.io/policy-configmap": "cm"}, {"app": "weather"}),
                               image="img", registry_url=None)
    assert options.upstream_url == "http://127.0.0.1:3000/sse" and options.server_name == "weather"
    args = sidecar_args(options)
    assert args[args.index("--upstream") + 1] == "http://127.0.0.1:3000/sse"
    assert "--registry" not in args and args[args.index("--policy") + 1].endswith("/policy.yaml")


@pytest.mark.parametrize("annotations, field", [
    ({"toolmesh.io/upstream-port": "http"}, "toolmesh.io/upstream-port"),
    ({"toolmesh.io/upstream-port": "70000"}, "toolmesh.io/upstream-port"),
    ({"toolmesh.io/upstream-path": "mcp"}, "toolmesh.io/upstream-path"),
    ({"toolmesh.io/transport": "stdio"}, "toolmesh.io/transport"),
])
def test_bad_annotations_are_refused_naming_the_annotation(annotations, field):
    with pytest.raises(InjectionError, match=field):
        options_from_pod(pod(annotations), image="img", registry_url=None)


def test_stdio_sidecar_attaches_to_the_fifo_directory():
    options = SidecarOptions(image="img", server_name="t", transport="stdio")
    args = sidecar_args(options)
    assert "--upstream-fifo-dir" in args and "--upstream" not in args
    out = inject_pod(pod(), options)
    assert any(v["name"] == "toolmesh-stdio" and "emptyDir" in v for v in out["spec"]["volumes"])
