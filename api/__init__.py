"""Typed models of MCPServer, MCPToolPolicy and the policy file; CRD generation. Imports nothing of toolmesh."""
