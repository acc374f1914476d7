"""Errors every component may raise to the command line: bad usage or bad configuration (exit code 2)."""


class UsageError(Exception):
    """Bad usage or bad configuration: reported on stderr as `toolmesh CMD: reason`, exit code 2."""
