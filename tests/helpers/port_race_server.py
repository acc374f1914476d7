"""An HTTP MCP server whose port is taken by another listener between `toolmesh up` choosing it and the bind.

Run as `python port_race_server.py --name NAME` in a folder, with `$PORT` set. The first start writes the
port to `port.wanted` and waits (up to 30 s) for the test to listen on it and say so in `port.taken`, then
starts the toy server there, which cannot bind. Later starts run the toy server at once.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

TOY = str(Path(__file__).with_name("toy_mcp_server.py"))


def main() -> None:
    name = sys.argv[sys.argv.index("--name") + 1]
    port = os.environ["PORT"]
    first = not Path("first.start").exists()
    if first:
        Path("first.start").write_text(str(os.getpid()))
        Path("port.wanted").write_text(port)
        deadline = time.monotonic() + 30
        while not Path("port.taken").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # polling a file the test writes, with a deadline
    os.execv(sys.executable, [sys.executable, TOY, "--name", name, "--port", port, "--tools", "echo"])


if __name__ == "__main__":
    main()
