"""Typed models of MCPServer, MCPToolPolicy and the policy file; CRD generation; the Kubernetes API client. Imports nothing of toolmesh."""
