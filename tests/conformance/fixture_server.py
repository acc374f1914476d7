"""The conformance fixture: an MCP server on the official Python SDK serving every tool, prompt and resource the suite's server scenarios call.

Run as `python fixture_server.py --port P`; it serves Streamable HTTP at
`http://127.0.0.1:P/mcp` for both protocol eras (2025-06-18/2025-11-25
sessions and the 2026-07-28 stateless requests). `--stdio` serves the same
over stdin/stdout instead, for a proxy that bridges stdio servers. Names and
expected contents come from the scenario sources of
@modelcontextprotocol/conformance 0.2.0-alpha.11.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import logging
from typing import Annotated, Any

import uvicorn
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.shared.exceptions import MCPError
from mcp.types import (
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    AudioContent,
    Completion,
    CreateMessageRequest,
    CreateMessageRequestParams,
    ElicitRequest,
    ElicitRequestFormParams,
    EmbeddedResource,
    EmptyResult,
    GetPromptResult,
    ImageContent,
    InputRequiredResult,
    ListRootsRequest,
    PromptMessage,
    SamplingMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextContent,
    TextResourceContents,
    UnsubscribeRequestParams,
)
from pydantic import BaseModel, Field

# A 1x1 PNG and a minimal WAV header: the suite only checks type, mimeType and that data is base64.
PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
WAV_BASE64 = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="


class MemoryEventStore(EventStore):
    """Keeps every SSE event so a client reconnecting with Last-Event-ID gets what it missed (SSE polling scenarios)."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str, Any]] = []
        self._ids = itertools.count(1)

    async def store_event(self, stream_id, message):
        event_id = str(next(self._ids))
        self._events.append((stream_id, event_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback):
        stream = next((s for s, e, _ in self._events if e == last_event_id), None)
        if stream is None:
            return None
        after = int(last_event_id)
        for s, e, message in list(self._events):
            if s == stream and int(e) > after and message is not None:
                await send_callback(EventMessage(message, e))
        return stream


mcp = MCPServer(name="toolmesh-conformance-fixture", version="1.0.0")
subscribed_uris: set[str] = set()


# --- tools -------------------------------------------------------------------------------------

@mcp.tool()
def test_simple_text() -> str:
    """Returns one text block."""
    return "This is a simple text response for testing."


@mcp.tool()
def test_image_content() -> list[ImageContent]:
    """Returns one image block."""
    return [ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")]


@mcp.tool()
def test_audio_content() -> list[AudioContent]:
    """Returns one audio block."""
    return [AudioContent(type="audio", data=WAV_BASE64, mime_type="audio/wav")]


@mcp.tool()
def test_embedded_resource() -> list[EmbeddedResource]:
    """Returns one embedded text resource."""
    return [EmbeddedResource(type="resource", resource=TextResourceContents(
        uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."))]


@mcp.tool()
def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
    """Returns text, image and resource blocks in one result."""
    return [
        TextContent(type="text", text="Multiple content types test:"),
        ImageContent(type="image", data=PNG_BASE64, mime_type="image/png"),
        EmbeddedResource(type="resource", resource=TextResourceContents(
            uri="test://mixed-content-resource", mime_type="application/json", text='{"test": "data", "value": 123}')),
    ]


@mcp.tool()
async def test_tool_with_logging(ctx: Context) -> str:
    """Sends three log notifications while it runs."""
    for text in ("Tool execution started", "Tool processing data", "Tool execution completed"):
        await ctx.info(text)
        await asyncio.sleep(0.05)
    return "Tool with logging executed successfully"


@mcp.tool()
async def test_tool_with_progress(ctx: Context) -> str:
    """Reports progress 0, 50 and 100 of 100."""
    for step in (0, 50, 100):
        await ctx.report_progress(progress=step, total=100, message=f"Completed step {step} of 100")
        await asyncio.sleep(0.05)
    meta = ctx.request_context.meta
    return str(getattr(meta, "progress_token", None) or 0)


@mcp.tool()
def test_error_handling() -> str:
    """Always fails, so the result carries isError."""
    raise RuntimeError("This tool intentionally returns an error for testing")


@mcp.tool()
async def test_sampling(prompt: str, ctx: Context) -> str:
    """Asks the client's model to complete `prompt`."""
    result = await ctx.session.create_message(
        messages=[SamplingMessage(role="user", content=TextContent(type="text", text=prompt))], max_tokens=100)
    text = result.content.text if getattr(result.content, "type", None) == "text" else "No response"
    return f"LLM response: {text}"


class UserResponse(BaseModel):
    response: str = Field(description="User's response")


@mcp.tool()
async def test_elicitation(message: str, ctx: Context) -> str:
    """Asks the user for one string."""
    result = await ctx.elicit(message=message, schema=UserResponse)
    content = result.data.model_dump_json() if result.action == "accept" else "{}"
    return f"User response: action={result.action}, content={content}"


class DefaultsForm(BaseModel):
    name: str = Field(default="John Doe", description="User name")
    age: int = Field(default=30, description="User age")
    score: float = Field(default=95.5, description="User score")
    status: str = Field(default="active", description="User status",
                        json_schema_extra={"enum": ["active", "inactive", "pending"]})
    verified: bool = Field(default=True, description="Verification status")


@mcp.tool()
async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
    """Elicits a form whose every primitive field has a default (SEP-1034)."""
    result = await ctx.elicit(message="Please provide user information", schema=DefaultsForm)
    content = result.data.model_dump_json() if result.action == "accept" else "{}"
    return f"Elicitation result: action={result.action}, content={content}"


class EnumForm(BaseModel):
    untitledSingle: str = Field(description="Simple enum without titles",
                                json_schema_extra={"enum": ["active", "inactive", "pending"]})
    titledSingle: str = Field(description="Enum with titled options (oneOf)", json_schema_extra={"oneOf": [
        {"const": "low", "title": "Low Priority"}, {"const": "medium", "title": "Medium Priority"},
        {"const": "high", "title": "High Priority"}]})
    untitledMulti: list[str] = Field(description="Multi-select without titles", json_schema_extra={
        "items": {"type": "string", "enum": ["read", "write", "execute"]}})
    titledMulti: list[str] = Field(description="Multi-select with titled options", json_schema_extra={"items": {
        "anyOf": [{"const": "feature", "title": "New Feature"}, {"const": "bug", "title": "Bug Fix"},
                  {"const": "docs", "title": "Documentation"}]}})
    legacyEnum: str = Field(description="Legacy enum with enumNames", json_schema_extra={
        "enum": ["small", "medium", "large"], "enumNames": ["Small Size", "Medium Size", "Large Size"]})


@mcp.tool()
async def test_elicitation_sep1330_enums(ctx: Context) -> str:
    """Elicits a form using each enum schema variant (SEP-1330)."""
    result = await ctx.elicit(message="Please select values using different enum schema types", schema=EnumForm)
    content = result.data.model_dump_json() if result.action == "accept" else "{}"
    return f"Elicitation completed: action={result.action}, content={content}"


@mcp.tool()
async def test_reconnection(ctx: Context) -> str:
    """Closes its SSE stream mid-call; the client resumes with Last-Event-ID (SEP-1699)."""
    await ctx.info("Before disconnect")
    await ctx.close_sse_stream()
    await asyncio.sleep(0.2)
    await ctx.info("After reconnect")
    return "Reconnection test completed"


# --- 2026-07-28: JSON Schema 2020-12, routing headers, stateless diagnostics -------------------

SCHEMA_2020_12 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {"address": {"$anchor": "addressDef", "type": "object",
                          "properties": {"street": {"type": "string"}, "city": {"type": "string"}}}},
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"},
                   "contactMethod": {"type": "string", "enum": ["phone", "email"]},
                   "phone": {"type": "string"}, "email": {"type": "string"}},
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}


@mcp.tool()
def json_schema_2020_12_tool(**contact: Any) -> str:
    """Tool with JSON Schema 2020-12 features"""
    return "ok"


# The listing must show the schema verbatim; the SDK would otherwise derive one from the signature.
mcp._tool_manager.get_tool("json_schema_2020_12_tool").parameters = SCHEMA_2020_12


@mcp.tool()
def test_custom_headers(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})]) -> str:
    """Echoes a parameter that travels in the Mcp-Param-Region header too (SEP-2243)."""
    return f"region={region}"


@mcp.tool()
async def test_missing_capability(ctx: Context) -> str:
    """Needs the client's sampling capability; refuses with -32021 when it was not declared."""
    capabilities = ctx.client_capabilities
    if capabilities is None or capabilities.sampling is None:
        raise MCPError(code=MISSING_REQUIRED_CLIENT_CAPABILITY, message="Client did not declare sampling",
                       data={"requiredCapabilities": {"sampling": {}}})
    return "Sampling capability is declared"


@mcp.tool()
async def test_logging_tool(ctx: Context) -> str:
    """Logs one message; a stateless request that set no log level must not receive it."""
    await ctx.info("diagnostic log message")
    return "logged"


@mcp.tool()
async def test_streaming_elicitation(ctx: Context) -> str | InputRequiredResult:
    """Asks for input through the result, never by a request of its own on the stream."""
    if "confirm" not in (ctx.input_responses or {}):
        return InputRequiredResult(input_requests={"confirm": elicit("Confirm?", {"ok": {"type": "boolean"}})})
    return "confirmed"


@mcp.tool()
async def test_trigger_tool_change(ctx: Context) -> str:
    """Announces a changed tool list to subscribed listeners."""
    await ctx.notify_tools_changed()
    return "tools changed"


@mcp.tool()
async def test_trigger_prompt_change(ctx: Context) -> str:
    """Announces a changed prompt list to subscribed listeners."""
    await ctx.notify_prompts_changed()
    return "prompts changed"


# --- 2026-07-28 multi-round-trip requests (SEP-2322) --------------------------------------------

def elicit(message: str, properties: dict[str, Any]) -> ElicitRequest:
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    return ElicitRequest(params=ElicitRequestFormParams(message=message, requested_schema=schema))


def sample(text: str, max_tokens: int) -> CreateMessageRequest:
    return CreateMessageRequest(params=CreateMessageRequestParams(
        messages=[SamplingMessage(role="user", content=TextContent(type="text", text=text))], max_tokens=max_tokens))


def answer(response: Any, key: str, default: str = "") -> str:
    """A field of an elicitation answer or the text of a sampling answer."""
    content = getattr(response, "content", None)
    if isinstance(content, dict):
        return str(content.get(key, default))
    return str(getattr(content, "text", default))


@mcp.tool()
async def test_input_required_result_elicitation(ctx: Context) -> str | InputRequiredResult:
    """Round 1 asks for a name; round 2 greets it."""
    responses = ctx.input_responses or {}
    if "user_name" not in responses:
        return InputRequiredResult(input_requests={"user_name": elicit("What is your name?", {"name": {"type": "string"}})})
    return f"Hello, {answer(responses['user_name'], 'name')}!"


@mcp.tool()
async def test_input_required_result_sampling(ctx: Context) -> str | InputRequiredResult:
    """Round 1 asks the client's model a question; round 2 returns its answer."""
    responses = ctx.input_responses or {}
    if "capital_question" not in responses:
        return InputRequiredResult(input_requests={"capital_question": sample("What is the capital of France?", 100)})
    return f"LLM response: {answer(responses['capital_question'], 'text')}"


@mcp.tool()
async def test_input_required_result_list_roots(ctx: Context) -> str | InputRequiredResult:
    """Round 1 asks for the client's roots; round 2 lists them."""
    responses = ctx.input_responses or {}
    if "client_roots" not in responses:
        return InputRequiredResult(input_requests={"client_roots": ListRootsRequest()})
    roots = getattr(responses["client_roots"], "roots", []) or []
    return "Roots: " + ", ".join(str(root.uri) for root in roots)


@mcp.tool()
async def test_input_required_result_request_state(ctx: Context) -> str | InputRequiredResult:
    """Round 1 hands out state; round 2 proves it came back intact."""
    responses = ctx.input_responses or {}
    if "confirm" not in responses or ctx.request_state != "awaiting-confirm":
        return InputRequiredResult(input_requests={"confirm": elicit("Please confirm", {"ok": {"type": "boolean"}})},
                                   request_state="awaiting-confirm")
    return "state-ok: confirmation received"


@mcp.tool()
async def test_input_required_result_multiple_inputs(ctx: Context) -> str | InputRequiredResult:
    """One round asking for an elicitation, a sampling and the roots at once."""
    responses = ctx.input_responses or {}
    wanted = {"user_name": elicit("What is your name?", {"name": {"type": "string"}}),
              "greeting": sample("Generate a greeting", 50), "client_roots": ListRootsRequest()}
    if not set(wanted) <= set(responses):
        return InputRequiredResult(input_requests=wanted, request_state="multiple-inputs")
    return f"Received all inputs for {answer(responses['user_name'], 'name')}"


@mcp.tool()
async def test_input_required_result_multi_round(ctx: Context) -> str | InputRequiredResult:
    """Two rounds of questions, the state evolving between them."""
    responses = ctx.input_responses or {}
    if ctx.request_state == "round-2" and "step2" in responses:
        return f"Completed: favorite color {answer(responses['step2'], 'color')}"
    if ctx.request_state == "round-1" and "step1" in responses:
        return InputRequiredResult(input_requests={"step2": elicit("Step 2: What is your favorite color?",
                                                                    {"color": {"type": "string"}})},
                                   request_state="round-2")
    return InputRequiredResult(input_requests={"step1": elicit("Step 1: What is your name?", {"name": {"type": "string"}})},
                               request_state="round-1")


@mcp.tool()
async def test_input_required_result_tampered_state(ctx: Context) -> str | InputRequiredResult:
    """Round 1 hands out state the SDK seals; a tampered copy is refused before this body runs."""
    if ctx.request_state != "sealed-state" or "confirm" not in (ctx.input_responses or {}):
        return InputRequiredResult(input_requests={"confirm": elicit("Please confirm", {"ok": {"type": "boolean"}})},
                                   request_state="sealed-state")
    return "state-ok"


@mcp.tool()
async def test_input_required_result_capabilities(ctx: Context) -> str | InputRequiredResult:
    """Asks only for what the client declared it can answer."""
    responses = ctx.input_responses or {}
    capabilities = ctx.client_capabilities
    wanted: dict[str, Any] = {}
    if capabilities is not None and capabilities.sampling is not None:
        wanted["question"] = sample("What is the capital of France?", 100)
    if capabilities is not None and capabilities.elicitation is not None:
        wanted["user_name"] = elicit("What is your name?", {"name": {"type": "string"}})
    if capabilities is not None and capabilities.roots is not None:
        wanted["client_roots"] = ListRootsRequest()
    if wanted and not set(wanted) <= set(responses):
        return InputRequiredResult(input_requests=wanted)
    return "capabilities respected"


# --- resources ---------------------------------------------------------------------------------

@mcp.resource("test://static-text", mime_type="text/plain")
def static_text() -> str:
    """A static text resource."""
    return "This is the content of the static text resource."


@mcp.resource("test://static-binary", mime_type="image/png")
def static_binary() -> bytes:
    """A static binary resource (a PNG)."""
    return base64.b64decode(PNG_BASE64)


@mcp.resource("test://template/{id}/data", mime_type="application/json")
def template_data(id: str) -> str:
    """A templated resource echoing its parameter."""
    return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})


@mcp.resource("test://watched-resource", mime_type="text/plain")
def watched() -> str:
    """A resource clients may subscribe to."""
    return "Watched resource content"


# --- prompts -----------------------------------------------------------------------------------

@mcp.prompt()
def test_simple_prompt() -> list[UserMessage]:
    """A prompt without arguments."""
    return [UserMessage(content=TextContent(type="text", text="This is a simple prompt for testing."))]


@mcp.prompt()
def test_prompt_with_arguments(arg1: str, arg2: str) -> list[UserMessage]:
    """A prompt with two required arguments."""
    return [UserMessage(content=TextContent(type="text", text=f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"))]


@mcp.prompt()
def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:
    """A prompt carrying an embedded resource."""
    return [
        UserMessage(content=EmbeddedResource(type="resource", resource=TextResourceContents(
            uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."))),
        UserMessage(content=TextContent(type="text", text="Please process the embedded resource above.")),
    ]


@mcp.prompt()
def test_prompt_with_image() -> list[UserMessage]:
    """A prompt carrying an image."""
    return [
        UserMessage(content=ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")),
        UserMessage(content=TextContent(type="text", text="Please analyze the image above.")),
    ]


@mcp.prompt()
async def test_input_required_result_prompt(ctx: Context) -> GetPromptResult | InputRequiredResult:
    """A prompt that first asks the user for its context."""
    responses = ctx.input_responses or {}
    if "user_context" not in responses:
        return InputRequiredResult(input_requests={"user_context": elicit("What context should the prompt use?",
                                                                           {"context": {"type": "string"}})})
    text = f"Prompt with context: {answer(responses['user_context'], 'context')}"
    return GetPromptResult(messages=[PromptMessage(role="user", content=TextContent(type="text", text=text))])


@mcp.completion()
async def complete(ref, argument, context) -> Completion:
    return Completion(values=[], total=0, has_more=False)


# --- session-era methods MCPServer has no decorator for -----------------------------------------

async def set_logging_level(ctx, params: SetLevelRequestParams) -> EmptyResult:
    return EmptyResult()


async def subscribe(ctx, params: SubscribeRequestParams) -> EmptyResult:
    subscribed_uris.add(str(params.uri))
    return EmptyResult()


async def unsubscribe(ctx, params: UnsubscribeRequestParams) -> EmptyResult:
    subscribed_uris.discard(str(params.uri))
    return EmptyResult()


lowlevel = mcp._lowlevel_server  # the SDK exposes these three only on the low-level server
lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, set_logging_level)
lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--stdio", action="store_true", help="serve over stdin/stdout instead of HTTP")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.stdio:
        mcp.run("stdio")
        return
    if args.port is None:
        parser.error("--port is required unless --stdio")
    # retry_interval: clients reconnect 100 ms after the fixture closes a stream (SSE polling scenario).
    app = mcp.streamable_http_app(event_store=MemoryEventStore(), retry_interval=100, host=args.host)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
