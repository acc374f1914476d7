"""The endpoint a sidecar reports must be one the gateway can reach, whatever address it listens on."""

from toolmesh.sidecar.control.heartbeat import HeartbeatSettings, reachable


def test_a_wildcard_listen_address_is_reported_as_the_pod_ip():
    assert reachable("http://0.0.0.0:7400/mcp", {"POD_IP": "10.1.2.3"}) == "http://10.1.2.3:7400/mcp"
    assert reachable("http://[::]:7400/mcp", {"POD_IP": "fd00::5"}) == "http://[fd00::5]:7400/mcp"
    assert reachable("http://127.0.0.1:7400/mcp", {"POD_IP": "10.1.2.3"}) == "http://127.0.0.1:7400/mcp"


def test_an_advertised_url_wins_and_the_pod_name_names_the_instance():
    env = {"TOOLMESH_ADVERTISE_URL": "http://time.default.svc:7400/mcp", "POD_NAME": "time-abc"}
    settings = HeartbeatSettings.from_env("http://registry:7401/", "time", "http://0.0.0.0:7400/mcp", env)
    assert (settings.endpoint, settings.instance, settings.registry) == (
        "http://time.default.svc:7400/mcp", "time-abc", "http://registry:7401")
