"""The sidecar's control loops: where its policy comes from (`policy_source.py`) and what it reports to the registry
(`heartbeat.py`)."""
