"""`toolmesh tools` and `toolmesh call`: list the tools a caller sees at an MCP URL, call one, print the result readably."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from toolmesh.api.errors import UsageError

MODES = ("auto", "legacy", "2026-07-28")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("url", help="the MCP endpoint, e.g. http://127.0.0.1:7400/mcp")
    if name == "call":
        parser.add_argument("tool", help="the tool's name")
        parser.add_argument("arguments", nargs="*", metavar="KEY=VALUE",
                            help="tool arguments; VALUE is read as JSON when it parses (42, true, [1,2]), else as text")
        parser.add_argument("--json", dest="json_arguments", metavar="OBJECT",
                            help="all arguments as one JSON object (KEY=VALUE pairs are merged over it)")
        parser.add_argument("--budget-key", metavar="KEY",
                            help="sent as Mcp-Budget-Key: calls with the same key share one context budget "
                                 "(without it each stateless call is budgeted alone)")
    parser.add_argument("--token", help="bearer token sent as Authorization")
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="protocol negotiation: auto (discover, fall back to initialize), legacy, or 2026-07-28")
    parser.add_argument("--output", choices=("text", "json"), default="text", help="how to print the answer")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer (default 300)")


def parse_arguments(pairs: list[str], json_arguments: str | None) -> dict[str, Any]:
    """Tool arguments from `--json` and KEY=VALUE pairs."""
    arguments: dict[str, Any] = {}
    if json_arguments:
        try:
            loaded = json.loads(json_arguments)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--json is not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise UsageError("--json must be a JSON object")
        arguments.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"arguments are KEY=VALUE, got {pair!r}")
        try:
            arguments[key] = json.loads(value)
        except json.JSONDecodeError:
            arguments[key] = value
    return arguments


def _client(args: argparse.Namespace):
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    budget_key = getattr(args, "budget_key", None)
    if budget_key:
        headers["Mcp-Budget-Key"] = budget_key
    http = create_mcp_http_client(headers=headers or None)
    return Client(streamable_http_client(args.url, http_client=http), mode=args.mode), http


def _root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def format_tools(tools: list[Any], red: dict[str, dict] | None = None) -> str:
    """One line per tool; `red` (from a gateway's /v1/tools) adds each tool's recent calls, errors and latency."""
    if not tools:
        return "(no tools)"
    width = max(len(t.name) for t in tools)
    lines = []
    for tool in sorted(tools, key=lambda t: t.name):
        ann = tool.annotations
        flags = []
        if ann is not None:
            if ann.read_only_hint:
                flags.append("read-only")
            if ann.destructive_hint is False:
                flags.append("non-destructive")
            if ann.idempotent_hint:
                flags.append("idempotent")
        summary = (tool.description or "").strip().splitlines()[0] if tool.description else ""
        suffix = f"  [{', '.join(flags)}]" if flags else ""
        figures = (red or {}).get(tool.name)
        if figures:
            suffix += (f"  ({figures['calls']} calls, {figures['errors']} errors, "
                       f"p50 {figures['p50Ms']:g} ms, p95 {figures['p95Ms']:g} ms)")
        lines.append(f"{tool.name.ljust(width)}  {summary}{suffix}".rstrip())
    return "\n".join(lines)


def format_result(result: Any) -> str:
    parts = []
    for block in result.content:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} {block.mime_type}, {len(block.data)} base64 characters]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}]")
        elif kind == "resource":
            resource = block.resource
            parts.append(getattr(resource, "text", None) or f"[resource {resource.uri}]")
        else:
            parts.append(json.dumps(block.model_dump(mode="json", by_alias=True, exclude_none=True)))
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, indent=2, ensure_ascii=False))
    return "\n".join(parts)


async def _tools(args: argparse.Namespace) -> int:
    client, _ = _client(args)
    async with client:
        tools: list[Any] = []
        cursor = None
        for _ in range(100):
            page = await client.list_tools(cursor=cursor) if cursor else await client.list_tools()
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
    if args.output == "json":
        print(json.dumps([t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools], indent=2))
    else:
        print(format_tools(tools, await asyncio.to_thread(_gateway_red_figures, args.url)))
    return 0


def _gateway_red_figures(url: str) -> dict[str, dict]:
    """RED figures per tool when `url` is a toolmesh gateway (its registry serves /v1/tools next to /mcp)."""
    import urllib.request

    base = url[: -len("/mcp")] if url.rstrip("/").endswith("/mcp") else None
    if base is None:
        return {}
    # The registry shows its catalogue only to holders of its credential (the heartbeat secret).
    secret = os.environ.get("TOOLMESH_REGISTRY_SECRET")
    secret_file = os.environ.get("TOOLMESH_REGISTRY_SECRET_FILE")
    try:
        if secret_file:
            secret = Path(secret_file).read_text().strip()
        request = urllib.request.Request(f"{base.rstrip('/')}/v1/tools",
                                         headers={"Authorization": f"Bearer {secret}"} if secret else {})
        with urllib.request.urlopen(request, timeout=2) as resp:
            listed = json.loads(resp.read())
        return {t["name"]: t["red"] for t in listed.get("tools", []) if t.get("red")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


async def _call(args: argparse.Namespace, arguments: dict[str, Any]) -> int:
    client, _ = _client(args)
    async with client:
        result = await client.call_tool(args.tool, arguments)
    if args.output == "json":
        print(json.dumps(result.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2, ensure_ascii=False))
    else:
        text = format_result(result)
        print(text, file=sys.stderr if result.is_error else sys.stdout)
    return 1 if result.is_error else 0


def run(args: argparse.Namespace) -> int:
    command = args.command
    arguments = parse_arguments(args.arguments, args.json_arguments) if command == "call" else {}
    work = _call(args, arguments) if command == "call" else _tools(args)
    try:
        return asyncio.run(asyncio.wait_for(work, args.timeout))
    except TimeoutError:
        print(f"toolmesh {command}: no answer from {args.url} within {args.timeout:g}s", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - any failure to reach or talk to the server, said plainly
        cause = _root_cause(exc)
        print(f"toolmesh {command}: {args.url}: {cause.__class__.__name__}: {cause}", file=sys.stderr)
        return 1
