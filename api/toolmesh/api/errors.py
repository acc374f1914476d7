"""The one error every component raises for bad usage or bad configuration; the command line exits 2 with it."""


class UsageError(Exception):
    """Bad usage or bad configuration: reported on stderr as `toolmesh CMD: reason`, exit code 2."""
