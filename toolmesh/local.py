"""`toolmesh up`: run MCPServer/MCPToolPolicy manifests as local processes behind sidecars, with the gateway."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="manifest files or folders")


def run(args: argparse.Namespace) -> int:
    from toolmesh.cli import UsageError

    raise UsageError("local mode is not built yet")
