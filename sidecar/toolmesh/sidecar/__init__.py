"""The sidecar: a transparent, policy-enforcing MCP proxy in front of one MCP server."""
