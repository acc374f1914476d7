"""Reading MCPServer manifests from files (the same YAML `kubectl apply` takes) into catalogue traits."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from pydantic import ValidationError

from toolmesh.api.server import MCPServerSpec
from toolmesh.registry.catalogue import ServerTraits


def documents(paths: Iterable[Path]) -> Iterator[tuple[Path, Mapping[str, Any]]]:
    """Every YAML document in the given files and folders (folders: their *.yaml / *.yml, sorted)."""
    for path in paths:
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
        if path.is_dir() is False and not path.exists():
            raise ValueError(f"{path}: no such file or folder")
        for file in files:
            try:
                docs = list(yaml.safe_load_all(file.read_text()))
            except (OSError, yaml.YAMLError) as exc:
                raise ValueError(f"{file}: {exc}") from None
            for doc in docs:
                if isinstance(doc, Mapping):
                    yield file, doc


def server_spec(file: Path, doc: Mapping[str, Any]) -> tuple[str, MCPServerSpec]:
    """Name and validated spec of one MCPServer document."""
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{file}: MCPServer without metadata.name")
    try:
        return name, MCPServerSpec.model_validate(doc.get("spec") or {})
    except ValidationError as exc:
        raise ValueError(f"{file}: MCPServer {name}: {exc}") from None


def traits_of(spec: MCPServerSpec) -> ServerTraits:
    """The traits a validated MCPServer spec declares (read as the cluster's specs and heartbeats are)."""
    return ServerTraits.from_fields(spec.model_dump())


def declare_from_files(app: web.Application, paths: Iterable[Path]) -> None:
    from toolmesh.registry.app import CATALOGUE

    for file, doc in documents(paths):
        if doc.get("kind") == "MCPServer":
            name, spec = server_spec(file, doc)
            app[CATALOGUE].declare(name, traits_of(spec))
