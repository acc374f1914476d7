"""toolmesh: make any MCP server production-ready on Kubernetes without changing it."""

__version__ = "0.1.0"
