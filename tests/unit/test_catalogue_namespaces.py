"""Gateway names across namespaces: one MCPServer name in two namespaces is two servers, each named `<ns>_<name>`."""

from __future__ import annotations

import logging

from toolmesh.registry.catalogue import Catalogue, ServerKey, ServerTraits


def beat(server: str, namespace: str | None, endpoint: str, *tools: str, **extra) -> dict:
    message = {"server": server, "endpoint": endpoint, "tools": [{"name": t, "description": t} for t in tools], **extra}
    if namespace is not None:
        message["namespace"] = namespace
    return message


def catalogue_with_two_searches() -> Catalogue:
    catalogue = Catalogue(clock=lambda: 100.0)
    catalogue.heartbeat(beat("search", "team-a", "http://a:1/mcp", "find", "index"))
    catalogue.heartbeat(beat("search", "team-b", "http://b:1/mcp", "find", "purge"))
    catalogue.heartbeat(beat("time", "team-a", "http://t:1/mcp", "now"))
    return catalogue


def test_one_name_in_two_namespaces_is_two_servers_with_qualified_names():
    catalogue = catalogue_with_two_searches()
    assert catalogue.servers() == ["team-a_search", "team-b_search", "time"]
    view = catalogue.view()
    assert [t["name"] for t in view.tools] == ["team-a_search__find", "team-a_search__index",
                                               "team-b_search__find", "team-b_search__purge", "time__now"]
    assert view.tools[2]["description"] == "[team-b_search] find"
    assert view.routes["team-a_search__index"].server == "team-a_search"
    assert view.routes["team-b_search__purge"].server == "team-b_search"
    assert catalogue.key("team-b_search") == ServerKey("team-b", "search")
    assert catalogue.gateway_name(ServerKey("team-a", "time")) == "time"


def test_calls_never_go_to_the_other_namespace():
    catalogue = catalogue_with_two_searches()
    # A second sidecar of team-a's search: round robin stays within team-a.
    catalogue.heartbeat(beat("search", "team-a", "http://a:2/mcp", "find", "index", instance="a-2"))
    picked = {catalogue.pick("team-a_search").endpoint for _ in range(6)}
    assert picked == {"http://a:1/mcp", "http://a:2/mcp"}
    assert {catalogue.pick("team-b_search").endpoint for _ in range(6)} == {"http://b:1/mcp"}
    assert {i.namespace for i in catalogue.instances(ServerKey("team-b", "search"))} == {"team-b"}
    assert catalogue.pick("search") is None  # the bare name no longer stands for either


def test_bare_tool_names_go_by_priority_then_gateway_name():
    catalogue = catalogue_with_two_searches()
    routes = catalogue.view().routes
    assert routes["find"].server == "team-a_search"  # a tie: the first gateway name alphabetically
    catalogue.declare("search", ServerTraits(priority=5), namespace="team-b")
    routes = catalogue.view().routes
    assert routes["find"].server == "team-b_search"
    assert routes["purge"].server == "team-b_search" and routes["index"].server == "team-a_search"


def test_removing_one_of_the_clashing_servers_brings_the_bare_name_back():
    catalogue = catalogue_with_two_searches()
    version = catalogue.version
    catalogue.forget("search", namespace="team-b")
    assert catalogue.version > version
    assert catalogue.servers() == ["search", "time"]
    view = catalogue.view()
    assert [t["name"] for t in view.tools] == ["search__find", "search__index", "time__now"]
    assert catalogue.pick(view.routes["search__find"].server).endpoint == "http://a:1/mcp"


def test_a_declared_server_without_sidecars_still_qualifies_the_name():
    # Names follow the MCPServers that exist, not which of them are up at the moment.
    catalogue = Catalogue(clock=lambda: 100.0)
    catalogue.heartbeat(beat("search", "team-a", "http://a:1/mcp", "find"))
    assert [t["name"] for t in catalogue.view().tools] == ["search__find"]
    catalogue.declare("search", ServerTraits(), namespace="team-b")
    assert [t["name"] for t in catalogue.view().tools] == ["team-a_search__find"]


def test_a_server_known_from_another_namespaces_status_renames_at_once():
    catalogue = Catalogue(clock=lambda: 100.0)
    catalogue.heartbeat(beat("search", "team-a", "http://a:1/mcp", "find"))
    catalogue.view()
    catalogue.observe_remote("search", "team-b", "http://b:1/mcp", [], seen_wall=0.0)
    view = catalogue.view()
    assert [t["name"] for t in view.tools] == ["team-a_search__find"]
    assert catalogue.pick(view.routes["team-a_search__find"].server).endpoint == "http://a:1/mcp"


def test_leaving_forgets_only_the_sidecar_of_that_namespace():
    catalogue = catalogue_with_two_searches()
    catalogue.forget("search", "http://b:1/mcp", namespace="team-a")  # not team-a's instance: nothing leaves
    assert catalogue.pick("team-b_search").endpoint == "http://b:1/mcp"
    catalogue.forget("search", "http://b:1/mcp", namespace="team-b")
    assert catalogue.pick("team-b_search") is None
    assert catalogue.pick("team-a_search").endpoint == "http://a:1/mcp"


def test_local_mode_names_are_unchanged():
    catalogue = Catalogue(clock=lambda: 100.0)
    catalogue.declare("search", ServerTraits(priority=1))
    catalogue.heartbeat(beat("search", None, "http://a:1/mcp", "find"))
    catalogue.heartbeat(beat("time", None, "http://t:1/mcp", "now"))
    assert catalogue.servers() == ["search", "time"]
    assert catalogue.keys() == [ServerKey(None, "search"), ServerKey(None, "time")]
    view = catalogue.view()
    assert [t["name"] for t in view.tools] == ["search__find", "time__now"]
    assert catalogue.traits("search").priority == 1
    catalogue.forget("search", "http://a:1/mcp")
    assert catalogue.healthy_instances("search") == []


def test_each_clash_is_logged_once(caplog):
    catalogue = Catalogue(clock=lambda: 100.0)
    with caplog.at_level(logging.WARNING, logger="toolmesh.registry"):
        catalogue.heartbeat(beat("search", "team-a", "http://a:1/mcp", "find"))
        for _ in range(3):
            catalogue.heartbeat(beat("search", "team-b", "http://b:1/mcp", "find"))
            catalogue.declare("search", ServerTraits(), namespace="team-b")
        catalogue.heartbeat(beat("other", "team-a", "http://o:1/mcp", "x"))
    clashes = [r.getMessage() for r in caplog.records if "exists in namespaces" in r.getMessage()]
    assert clashes == ["MCPServer 'search' exists in namespaces team-a, team-b: its tools are listed as "
                       "<namespace>_search__<tool>"]


def test_the_view_is_built_once_per_change():
    catalogue = catalogue_with_two_searches()
    view = catalogue.view()
    catalogue.heartbeat(beat("search", "team-b", "http://b:1/mcp", "find", "purge"))  # same as before
    assert catalogue.view() is view
