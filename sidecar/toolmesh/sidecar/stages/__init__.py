"""Policy stages of the sidecar chain, one concern per file; the order is written once in chain.py."""
