"""Check the import-direction contracts in pyproject.toml with import-linter.

The packages live in top-level folders mapped by setuptools `package-dir`,
which import-linter's graph builder cannot follow in an editable install, so
the installed layout is copied (sources only) into build/importgraph first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    target = ROOT / "build" / "importgraph"
    shutil.rmtree(target, ignore_errors=True)
    for package in setup["packages"]:
        src = ROOT / setup["package-dir"][package]
        dest = target.joinpath(*package.split("."))
        dest.mkdir(parents=True, exist_ok=True)
        for file in src.glob("*.py"):
            shutil.copy2(file, dest / file.name)
    env = dict(os.environ, PYTHONPATH=str(target))
    lint = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([str(lint), str(ROOT / "pyproject.toml")], cwd=target, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
