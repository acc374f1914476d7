"""The conformance fixture server served with the SDK's legacy HTTP+SSE transport, for the legacy SSE adapter."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[2] / "conformance" / "fixture_server.py"


def main() -> None:
    spec = importlib.util.spec_from_file_location("fixture_server", FIXTURE)
    fixture = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fixture  # its annotations resolve through the module's own globals
    spec.loader.exec_module(fixture)
    logging.basicConfig(level=logging.WARNING)
    fixture.mcp.run("sse", host="127.0.0.1", port=int(sys.argv[1]))


if __name__ == "__main__":
    main()
