"""Reads the Dockerfile into stages and instructions, and replays a stage's COPY/RUN steps on this machine.

There is no Docker engine on the build machines; replaying the build stage with its absolute paths
mapped into a temporary directory is how tests install the image's virtualenv exactly as the image does.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Instruction:
    keyword: str
    """Upper-case instruction name: FROM, RUN, COPY, ENV, ..."""
    text: str
    """Everything after the keyword, continuation lines joined."""


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order (comments and parser directives dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, text = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = text.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if keyword == "ARG":
                key, _, value = text.partition("=")
                global_args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append(Instruction(keyword, text.strip()))
    return global_args, stages


def env_of(stage: Stage) -> dict[str, str]:
    """The stage's ENV settings (`KEY=VALUE` pairs; `$PATH` left for the caller to expand)."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for pair in shlex.split(instruction.text):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def replay(stage: Stage, paths: dict[str, Path], *, env: dict[str, str], log: Path) -> None:
    """Run the stage's WORKDIR/COPY/RUN steps with `bash`, each absolute path in `paths` mapped to a local one.

    COPY sources are taken from the repository root, as `docker build .` would; RUN commands run in the
    mapped WORKDIR. A failing step raises with the log's tail.
    """
    def mapped(text: str) -> str:
        # Longest first, so /opt/toolmesh/bin is not cut by /opt.
        for container_path in sorted(paths, key=len, reverse=True):
            text = text.replace(container_path, str(paths[container_path]))
        return text

    workdir = ROOT
    with log.open("a") as out:
        for instruction in stage.instructions:
            if instruction.keyword == "WORKDIR":
                workdir = Path(mapped(instruction.text))
                workdir.mkdir(parents=True, exist_ok=True)
            elif instruction.keyword == "COPY":
                *sources, dest = shlex.split(instruction.text)
                target = workdir / dest if not os.path.isabs(mapped(dest)) else Path(mapped(dest))
                for source in sources:
                    src = ROOT / source.rstrip("/")
                    if src.is_dir():
                        shutil.copytree(src, target, dirs_exist_ok=True,
                                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                    else:
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, target / src.name)
            elif instruction.keyword == "RUN":
                command = mapped(instruction.text)
                out.write(f"\n$ {command}\n")
                out.flush()
                result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=workdir, env=env,
                                        stdout=out, stderr=subprocess.STDOUT, timeout=600)
                if result.returncode != 0:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                    raise AssertionError(f"Dockerfile step failed ({result.returncode}): {command}\n{tail}")
