"""The shared store reaches every sidecar: its URL in the environment, its password only through a secretKeyRef."""

from __future__ import annotations

import argparse

import pytest

from toolmesh.api.errors import UsageError
from toolmesh.operator.inject import SIDECAR_NAME, StateStore, options_from_pod, sidecar_container
from toolmesh.operator.render import OperatorConfig, render_server

SERVER = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
          "metadata": {"name": "echo", "namespace": "team-a", "uid": "u1", "generation": 1},
          "spec": {"image": "example.org/echo:1"}}


def sidecar_env(config: OperatorConfig) -> dict[str, dict]:
    rendered = render_server(SERVER, [], config)
    deployment = next(m for m in rendered.manifests if m["kind"] == "Deployment")
    sidecar = next(c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == SIDECAR_NAME)
    return {e["name"]: e for e in sidecar["env"]}


def test_a_servers_sidecar_gets_the_store_and_the_password_by_reference():
    env = sidecar_env(OperatorConfig(state=StateStore("rediss://redis.infra:6380/0", "redis-auth", "pw")))
    assert env["TOOLMESH_STATE_REDIS_URL"]["value"] == "rediss://redis.infra:6380/0"
    assert env["TOOLMESH_STATE_REDIS_PASSWORD"] == {
        "name": "TOOLMESH_STATE_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "pw"}}}
    # The namespace names the sidecar's keys in the store, so two namespaces never share a ledger.
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_without_a_store_nothing_is_set_and_without_a_secret_no_password():
    assert not {"TOOLMESH_STATE_REDIS_URL", "TOOLMESH_STATE_REDIS_PASSWORD"} & set(sidecar_env(OperatorConfig()))
    env = sidecar_env(OperatorConfig(state=StateStore("redis://redis.infra:6379/0")))
    assert "TOOLMESH_STATE_REDIS_URL" in env and "TOOLMESH_STATE_REDIS_PASSWORD" not in env


def test_an_injected_pod_gets_the_store_too():
    pod = {"metadata": {"name": "p", "labels": {"app": "mcp"}}, "spec": {"containers": []}}
    options = options_from_pod(pod, image="toolmesh:dev", registry_url=None, state=StateStore("redis://r:6379"))
    assert {"name": "TOOLMESH_STATE_REDIS_URL", "value": "redis://r:6379"} in sidecar_container(options)["env"]


@pytest.mark.parametrize(("argv", "complaint"), [
    (["--state-redis-url", "http://redis:6379"], "redis://, rediss:// or unix://"),
    (["--state-redis-url", "redis://:hunter2@redis:6379"], "must not hold credentials"),
    (["--state-redis-secret", "redis-auth"], "needs --state-redis-url"),
])
def test_the_operator_refuses_a_store_it_would_leak_or_cannot_use(argv, complaint, monkeypatch):
    from toolmesh.operator import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--no-webhook", *argv])
    monkeypatch.setattr("toolmesh.operator.kube.load_api_client", lambda **_: pytest.fail("reached the cluster"))
    with pytest.raises(UsageError, match=complaint):
        command.run(args)


def test_a_missing_password_secret_is_said_before_a_pod_would_fail():
    from toolmesh.operator.render import MissingSecret

    config = OperatorConfig(state=StateStore("redis://r:6379", "redis-auth", "password"))
    with pytest.raises(MissingSecret, match="team-a/redis-auth does not exist") as raised:
        render_server(SERVER, [], config, secret_keys=lambda name: None)
    assert "state.redis.existingSecret" in str(raised.value)
    with pytest.raises(MissingSecret, match="has no key 'password'"):
        render_server(SERVER, [], config, secret_keys=lambda name: {"pass"})
    assert render_server(SERVER, [], config, secret_keys=lambda name: {"password"}).manifests
