"""The `toolmesh` command line: one entry point, one subcommand per component.

Each subcommand lives in a module exposing `add_arguments(parser)` and
`run(args) -> int`; only the chosen one is imported, so `toolmesh sidecar`
does not pay for kopf or the Kubernetes client at start-up.
Exit codes: 0 ok, 2 bad usage or bad config (reason on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from toolmesh.api.errors import UsageError as _UsageError

# name -> (module, one-line help). The contract users rely on is in the README, "Command line".
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("toolmesh.local", "run MCPServer/MCPToolPolicy manifests locally, print the gateway URL"),
    "sidecar": ("toolmesh.sidecar.command", "run the policy-enforcing MCP proxy in front of one server"),
    "registry": ("toolmesh.registry.command", "run the tool registry and the gateway MCP endpoint"),
    "operator": ("toolmesh.operator.command", "run the Kubernetes operator and its admission webhook"),
    "crds": ("toolmesh.crds_command", "print the CustomResourceDefinitions as YAML"),
    "tools": ("toolmesh.client", "list the tools a caller sees at an MCP URL"),
    "call": ("toolmesh.client", "call one tool at an MCP URL and print the result"),
}


DESCRIPTION = "toolmesh: make any MCP server production-ready on Kubernetes without changing it."
__version__ = importlib.metadata.version("toolmesh")

# Components raise it from toolmesh.api (they never import the CLI); re-exported here.
UsageError = _UsageError


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolmesh", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"toolmesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            if name in ("tools", "call"):
                module.add_arguments(p, name)
            else:
                module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UsageError as exc:
        print(f"toolmesh {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
