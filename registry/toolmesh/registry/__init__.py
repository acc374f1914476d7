"""The cluster-wide registry: catalogue, heartbeats, OTLP receiver, gateway MCP endpoint, delegation."""
