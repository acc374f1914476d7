"""The registry's Prometheus metrics: gateway calls by server and outcome, sessions, heartbeats, catalogue size.

Label sets stay bounded whatever callers send: a call's `server` label is a
catalogue server's gateway name (or `toolmesh` for the registry's own tools,
`_unknown` for a name that leads nowhere), and only servers still in the
catalogue are exposed; outcomes and heartbeat results are fixed sets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

CALL_OUTCOMES = ("ok", "tool_error", "refused", "unavailable", "error", "cancelled")
"""ok: a result; tool_error: a result with isError; refused: the server's policy said 401/403; unavailable: no
instance answered, or the upstream failed the call (HTTP 5xx); error: any other JSON-RPC error; cancelled."""
HEARTBEAT_RESULTS = ("accepted", "leaving", "refused", "invalid")
UNKNOWN_SERVER = "_unknown"
LOCAL_SERVER = "toolmesh"


class RegistryMetrics:
    """Counters the registry keeps, and the text exposition of them and of gauges read at scrape time."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        """(server, outcome) → gateway `tools/call`s."""
        self.heartbeats: Counter[str] = Counter()
        """Result → heartbeats received."""

    def call(self, server: str, outcome: str) -> None:
        self.calls[(server, outcome)] += 1

    def heartbeat(self, result: str) -> None:
        self.heartbeats[result] += 1

    def render(self, *, servers: Iterable[str], sessions: int, anonymous_sessions: int, tools: int,
               instances: Counter[str], version: int) -> str:
        servers = set(servers)
        known = servers | {LOCAL_SERVER, UNKNOWN_SERVER}
        for key in [k for k in self.calls if k[0] not in known]:
            del self.calls[key]  # a server that left the catalogue takes its series along
        lines = ["# HELP toolmesh_gateway_calls_total Gateway tools/call requests by server and outcome.",
                 "# TYPE toolmesh_gateway_calls_total counter"]
        lines += [f'toolmesh_gateway_calls_total{{server="{_label(s)}",outcome="{o}"}} {n}'
                  for (s, o), n in sorted(self.calls.items())]
        lines += ["# HELP toolmesh_gateway_sessions_open Gateway sessions open now (session-era clients).",
                  "# TYPE toolmesh_gateway_sessions_open gauge", f"toolmesh_gateway_sessions_open {sessions}",
                  "# HELP toolmesh_gateway_anonymous_sessions_open Gateway sessions opened without a credential.",
                  "# TYPE toolmesh_gateway_anonymous_sessions_open gauge",
                  f"toolmesh_gateway_anonymous_sessions_open {anonymous_sessions}",
                  "# HELP toolmesh_registry_heartbeats_total Heartbeats received, by result.",
                  "# TYPE toolmesh_registry_heartbeats_total counter"]
        lines += [f'toolmesh_registry_heartbeats_total{{result="{r}"}} {self.heartbeats[r]}'
                  for r in HEARTBEAT_RESULTS]
        lines += ["# HELP toolmesh_catalogue_servers Servers the registry knows (healthy or not).",
                  "# TYPE toolmesh_catalogue_servers gauge", f"toolmesh_catalogue_servers {len(servers)}",
                  "# HELP toolmesh_catalogue_tools Tools the gateway lists now.",
                  "# TYPE toolmesh_catalogue_tools gauge", f"toolmesh_catalogue_tools {tools}",
                  "# HELP toolmesh_catalogue_instances Sidecar instances by state.",
                  "# TYPE toolmesh_catalogue_instances gauge"]
        lines += [f'toolmesh_catalogue_instances{{state="{state}"}} {instances[state]}'
                  for state in ("healthy", "unhealthy", "expired")]
        lines += ["# HELP toolmesh_catalogue_version Bumped at every change of the healthy tool set.",
                  "# TYPE toolmesh_catalogue_version gauge", f"toolmesh_catalogue_version {version}"]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
