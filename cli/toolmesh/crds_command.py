"""`toolmesh crds`: print the CRDs generated from the api models."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", help="write one file per CRD into DIR instead of stdout")


def run(args: argparse.Namespace) -> int:
    from toolmesh.api.crds import render_crd_files

    files = render_crd_files()
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)
    else:
        sys.stdout.write("".join(files[name] for name in sorted(files)))
    return 0
