"""The gateway: one MCP Streamable HTTP endpoint composing every healthy server's tools, both protocol eras.

Session era (2025-06-18, 2025-11-25): `initialize` opens a gateway session
(`Mcp-Session-Id`); `notifications/tools/list_changed` goes out on the
session's GET stream. Stateless era (2026-07-28): `server/discover`, then
self-contained POSTs, passed on in that era to sidecars whose servers speak
it; `subscriptions/listen` is the notification stream.
Calls go to a healthy sidecar with the caller's own bearer token, so the
sidecar's policy still decides: the gateway is never a bypass.

One module per family of methods, each registering its methods into the
endpoint's table (`calls.MethodTable`); a family imports only what sits below
it (the import-linter contract in pyproject.toml):

- `endpoint`: `Gateway`, HTTP POST/GET/DELETE, dispatch, initialize, ping, server/discover, OAuth metadata
- `tools` | `subscriptions`: tools/list and tools/call | resources/subscribe, list_changed fan-out, GET streams
- `composed` | `relay`: prompts, resources, completion, logging | a server's questions put to its caller
- `routing`: a request to a healthy instance's sidecar, failing over once
- `calls`: the caller, one method call, the method table, the answers' shapes
- `sessions`: session-era sessions, bound to their principal and bounded
"""

from toolmesh.registry.gateway.calls import Caller, LocalTool, ToolCallFailed
from toolmesh.registry.gateway.endpoint import Gateway
from toolmesh.registry.gateway.routing import Sidecars

__all__ = ["Caller", "Gateway", "LocalTool", "Sidecars", "ToolCallFailed"]
