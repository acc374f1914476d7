"""Writes charts/toolmesh/values.schema.json from the comments and defaults in values.yaml, so the two cannot drift.

    .venv/bin/python scripts/values_schema.py          # rewrite the schema
    .venv/bin/python scripts/values_schema.py --check  # exit 1 when it is stale

The comment block right above a value is its `description` (a leading `-- ` is dropped). Its type comes from the
default: a string, integer, number, boolean, list (items typed by the first element) or map. A map with keys is
closed (`additionalProperties: false`); an empty map is open. Lines of that block of the form

    # +schema:KEYWORD=VALUE

set a JSON Schema (draft-07) keyword on the value instead of describing it. VALUE is JSON when it parses as JSON,
a plain string otherwise (`pattern=^[a-z]+$`). A dotted KEYWORD sets a nested one (`properties.add={...}`); a
`type` or `$ref` replaces the inferred type. When a map's `additionalProperties` is a schema, its listed keys are
entries of that map and take that schema. The file's first comment block, ended by a blank line, annotates the
root: the `title` and `definitions` that `$ref` points at.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent.parent / "charts" / "toolmesh"
VALUES = CHART / "values.yaml"
OUTPUT = CHART / "values.schema.json"

KEY = re.compile(r"^\s*[\w.-]+:")
MARKER = re.compile(r"^\s*#\s*\+schema")
ANNOTATION = re.compile(r"^\s*#\s*\+schema:([\w$.]+)=(.*)$")
KEYWORDS = {
    "$ref", "additionalProperties", "const", "definitions", "enum", "exclusiveMaximum", "exclusiveMinimum", "format",
    "items", "maxItems", "maxLength", "maximum", "minItems", "minLength", "minimum", "multipleOf", "pattern",
    "properties", "required", "title", "type", "uniqueItems",
}
"""The keywords an annotation may set; anything else is a typo the generator refuses."""
SCALAR_TYPES = {"tag:yaml.org,2002:str": "string", "tag:yaml.org,2002:int": "integer",
                "tag:yaml.org,2002:float": "number", "tag:yaml.org,2002:bool": "boolean"}


class ValuesError(ValueError):
    """values.yaml breaks a rule of the syntax above; the message names the line."""


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _comment_block(lines: list[str], line: int) -> list[str]:
    """The comment lines right above line `line` (0-based), top first."""
    block: list[str] = []
    while line > 0 and lines[line - 1].lstrip().startswith("#"):
        line -= 1
        block.insert(0, lines[line])
    return block


def _annotate(block: list[str], where: str) -> tuple[str, dict]:
    """Splits a comment block into the description and the keywords its annotations set."""
    words, keywords = [], {}
    for line in block:
        match = ANNOTATION.match(line)
        if match is None:
            if MARKER.match(line):
                raise ValuesError(f"{where}: not `# +schema:KEYWORD=VALUE`: {line.strip()}")
            words.append(line.strip().removeprefix("#").strip())
            continue
        path, value = match.group(1).split("."), _parse_value(match.group(2).strip())
        if path[0] not in KEYWORDS:
            raise ValuesError(f"{where}: unknown schema keyword {path[0]!r}")
        node = keywords
        for step in path[:-1]:
            node = node.setdefault(step, {})
        node[path[-1]] = value
    description = " ".join(w for w in words if w).removeprefix("-- ")
    return description, keywords


def _merge(schema: dict, keywords: dict) -> dict:
    """`schema` with `keywords` set on it, maps merged key by key; `keywords` is left as it was."""
    for key, value in keywords.items():
        if isinstance(value, dict) and isinstance(schema.get(key), dict):
            _merge(schema[key], value)
        else:
            schema[key] = copy.deepcopy(value)
    return schema


def _scalar_type(node: yaml.Node, where: str) -> str:
    if node.tag not in SCALAR_TYPES:
        raise ValuesError(f"{where}: no type follows from {node.value!r}: annotate it with `# +schema:type=...`")
    return SCALAR_TYPES[node.tag]


def _schema(key: yaml.Node, value: yaml.Node, lines: list[str], entry: dict | None = None) -> dict:
    """The schema of one value: description and keywords from the comments above `key`, the rest from the default.

    `entry` is the schema of the map the value is an entry of, if that map's `additionalProperties` gives one."""
    where = f"values.yaml:{key.start_mark.line + 1}"
    description, keywords = _annotate(_comment_block(lines, key.start_mark.line), where)
    if not description:
        raise ValuesError(f"{where}: `{key.value}` has no description in a comment above it")
    schema: dict = {"description": description}
    if entry is not None and "$ref" not in keywords and "type" not in keywords:
        return _merge(_merge(schema, entry), keywords)
    return _typed(schema, keywords, value, lines, where)


def _typed(schema: dict, keywords: dict, value: yaml.Node, lines: list[str], where: str) -> dict:
    """`schema` with the type the default implies, unless the keywords give one, and then the keywords."""
    inferred = "$ref" not in keywords and "type" not in keywords
    if isinstance(value, yaml.MappingNode):
        if inferred:
            schema["type"] = "object"
        if value.value and "additionalProperties" not in keywords:
            schema["additionalProperties"] = False
        entry = keywords.get("additionalProperties")
        entry = entry if isinstance(entry, dict) else None
        properties = {k.value: _schema(k, v, lines, entry) for k, v in value.value}
        _merge(schema, keywords)
        if properties:
            schema["properties"] = _merge(properties, schema.get("properties", {}))
        return schema
    if isinstance(value, yaml.SequenceNode):
        if inferred:
            schema["type"] = "array"
        if value.value and "items" not in keywords:
            schema["items"] = {"type": _scalar_type(value.value[0], where)}
    elif inferred:
        schema["type"] = _scalar_type(value, where)
    return _merge(schema, keywords)


def _refuse_stray_annotations(lines: list[str]) -> None:
    """An annotation in a comment block that no value follows would be lost without a word."""
    for number, line in enumerate(lines):
        if not MARKER.match(line):
            continue
        below = number
        while below < len(lines) and lines[below].lstrip().startswith("#"):
            below += 1
        header = all(lines[n].lstrip().startswith("#") for n in range(below))
        if below == len(lines) or not (KEY.match(lines[below]) or (header and not lines[below].strip())):
            raise ValuesError(f"values.yaml:{number + 1}: no value follows this annotation")


def render_schema(values_text: str) -> str:
    """values.schema.json for a values.yaml, as the text the chart ships."""
    root = yaml.compose(values_text)
    if not isinstance(root, yaml.MappingNode):
        raise ValuesError("values.yaml: not a map of values")
    lines = values_text.splitlines()
    _refuse_stray_annotations(lines)
    header = []
    for line in lines:
        if not line.lstrip().startswith("#"):
            header = header if not line.strip() else []  # a block touching the first value is that value's
            break
        header.append(line)
    description, keywords = _annotate(header, "values.yaml:1")
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "description": description}
    schema = _typed(schema, keywords, root, lines, "values.yaml:1")
    return json.dumps(schema, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when values.schema.json is stale")
    args = parser.parse_args()
    try:
        text = render_schema(VALUES.read_text())
    except ValuesError as error:
        print(f"charts/toolmesh/{error}", file=sys.stderr)
        return 2
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run `make chart-schema`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
