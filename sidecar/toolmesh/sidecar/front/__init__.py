"""The sidecar's front: the HTTP endpoint MCP clients call (`endpoint.py`) and the app wiring the rooms (`app.py`)."""
