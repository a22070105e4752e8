"""The published wire models: request and response bodies of the API as pydantic models, for /openapi.json.

Design note: these models *describe* the API (shaped as the OpenAI specification describes chat
completions, models and errors, plus our extensions) so that generated clients and fuzzers can use it. They
do not parse requests: protocol.py's parser does, because it turns every mistake into *one* OpenAI-style
error naming the field with a fitting status (FastAPI's default would be a 422 listing pydantic's errors).
The two are kept in agreement by tests/test_serve_fuzz.py: schemathesis generates bodies from this schema
and sends them to the real server, and a body the schema allows must be answered 200 or refused only for
what a schema cannot say (the context length, media content, message order).

The request models forbid fields they do not list (`additionalProperties: false`), as the server refuses an
unknown top-level field (protocol.Fields); a field the server does not implement is listed only with its
neutral value (`n: 1`, `logprobs: false`), the only value it accepts.

`openapi(app, config)` builds the document: FastAPI's own (routes, the response models given with each
route) plus the request body, whose model lives only here since the routes read raw bodies.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, RootModel
from pydantic.json_schema import models_json_schema

from ..limits import SEED_RANGE
from .protocol import MAX_STOP_STRINGS, MAX_TOP_K


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send many optional fields: ignored, not refused


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown top-level field is a 400 (protocol.Fields)


# -- request ---------------------------------------------------------------------------------------------

class TextContentPart(_Open):
    type: Literal["text"]
    text: str


class MediaURL(_Open):
    url: str = Field(min_length=1, description="data: URL, file:// URL (with --allowed-media-dir) or http(s):// URL")
    detail: Optional[str] = None


class ImageContentPart(_Open):
    type: Literal["image_url"]
    image_url: Union[MediaURL, Annotated[str, Field(min_length=1)]]


class VideoContentPart(_Open):
    """hyperowl's extension: a video, sampled to at most the server's --max-frames frames."""

    type: Literal["video_url"]
    video_url: Union[MediaURL, Annotated[str, Field(min_length=1)]]


UserContentPart = Annotated[Union[TextContentPart, ImageContentPart, VideoContentPart], Field(discriminator="type")]


class SystemMessage(_Open):
    role: Literal["system", "developer"] = Field(description="only as the first message")
    content: Union[str, list[TextContentPart]]


class UserMessage(_Open):
    role: Literal["user"]
    content: Union[str, list[UserContentPart]]


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: Union[str, list[TextContentPart], None] = None


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage], Field(discriminator="role")]


class StreamOptions(_Open):
    include_usage: Optional[bool] = None


class _Bookkeeping(_Request):
    """Accepted and ignored by design: the caller's bookkeeping and routing hints (protocol.BOOKKEEPING)."""

    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    safety_identifier: Optional[str] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None


class _Sampling(_Request):
    """The sampling fields every generating endpoint reads (besides its own max-tokens field)."""

    min_tokens: Optional[int] = Field(None, ge=0, description="extension: no stop before this many tokens; "
                                                               "at most the max tokens")
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, le=MAX_TOP_K, description="extension: 0 or -1 = off")
    repetition_penalty: Optional[float] = Field(None, gt=0, description="extension (HF rule)")
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Union[Annotated[str, Field(min_length=1)],
                Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)], None] = None


class ChatCompletionRequest(_Bookkeeping):
    """POST /v1/chat/completions. The last message must not be an assistant message."""

    model: Optional[str] = Field(None, description="the served model's id (GET /v1/models); default: that one")
    messages: list[Message] = Field(min_length=1)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1, description="prompt + max_tokens must fit the model's context")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="same as max_tokens (max_tokens wins)")
    min_tokens: Optional[int] = Field(None, ge=0, description="extension: no stop before this many tokens; "
                                                               "at most max_tokens")
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, le=MAX_TOP_K, description="extension: 0 or -1 = off")
    repetition_penalty: Optional[float] = Field(None, gt=0, description="extension (HF rule)")
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Union[Annotated[str, Field(min_length=1)],
                Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)], None] = None
    n: Optional[int] = Field(None, ge=1, le=8, description="choices (1-8); choice i is seeded seed + i")
    logprobs: Optional[bool] = Field(None, description="each answer token's log probability (the model's, raw)")
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, description="that many most likely tokens per position; "
                                                                     "needs logprobs: true")
    response_format: Optional[dict[str, Any]] = Field(None, description="{type: text | json_object | json_schema "
                                                      "(json_schema: {name, schema, strict})}: grammar-constrained")
    store: Optional[bool] = Field(None, description="ignored: chat completions are not stored")
    parallel_tool_calls: Optional[bool] = Field(None, description="ignored: no tools")


class CompletionRequest(_Sampling):
    """POST /v1/completions (legacy): a raw prompt, no chat template, text only."""

    user: Optional[str] = Field(None, description="ignored (the caller's bookkeeping)")
    model: Optional[str] = Field(None, description="the served model's id (GET /v1/models); default: that one")
    prompt: Union[Annotated[str, Field(min_length=1)],
                  Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]]
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1, description="default 16; prompt + max_tokens must fit the context")
    echo: Optional[Literal[False]] = Field(None, description="only false")
    n: Optional[int] = Field(None, ge=1, le=8, description="choices (1-8); choice i is seeded seed + i")
    best_of: Optional[int] = Field(None, ge=1, le=8, description="candidates made (n-8); the n with the highest "
                                                                 "mean token logprob are returned; not streamed")
    logprobs: Optional[int] = Field(None, ge=0, le=5, description="the legacy logprobs object with that many "
                                                                  "alternatives per token")


class InputText(_Open):
    type: Literal["input_text"]
    text: str


class InputImage(_Open):
    type: Literal["input_image"]
    image_url: str = Field(min_length=1, description="data: URL, file:// URL (with --allowed-media-dir) or "
                                                     "http(s):// URL")
    detail: Optional[str] = None


class OutputTextInput(_Open):
    """An earlier answer's text, in an assistant message of `input`."""

    type: Literal["output_text"]
    text: str


class ResponseSystemMessage(_Open):
    type: Optional[Literal["message"]] = None
    role: Literal["system", "developer"] = Field(description="only first, and not beside `instructions`")
    content: Union[str, list[InputText]]


class ResponseUserMessage(_Open):
    type: Optional[Literal["message"]] = None
    role: Literal["user"]
    content: Union[str, list[Annotated[Union[InputText, InputImage], Field(discriminator="type")]]]


class ResponseAssistantMessage(_Open):
    type: Optional[Literal["message"]] = None
    role: Literal["assistant"]
    content: Union[str, list[Annotated[Union[OutputTextInput, InputText], Field(discriminator="type")]]]


InputMessage = Annotated[Union[ResponseSystemMessage, ResponseUserMessage, ResponseAssistantMessage],
                         Field(discriminator="role")]


class ResponseRequest(_Bookkeeping, _Sampling):
    """POST /v1/responses. `seed`, `stop`, `top_k`, `repetition_penalty`, `min_tokens` are extensions."""

    model: Optional[str] = Field(None, description="the served model's id (GET /v1/models); default: that one")
    input: Union[str, Annotated[list[InputMessage], Field(min_length=1)]] = Field(
        description="a user message's text, or messages; the last one not the assistant's")
    instructions: Optional[str] = Field(None, description="a system message before the conversation")
    max_output_tokens: Optional[int] = Field(None, ge=1, description="prompt + max_output_tokens must fit the context")
    text: Optional[dict[str, Any]] = Field(None, description="{format: {type: text | json_object | json_schema, "
                                                             "name, schema, strict}}: grammar-constrained")
    stream: Optional[bool] = None
    previous_response_id: Optional[str] = Field(None, description="continue a stored response's conversation")
    store: Optional[bool] = Field(None, description="keep the response for previous_response_id and GET (default "
                                                    "true; in memory, LRU)")
    parallel_tool_calls: Optional[bool] = Field(None, description="ignored: no tools")
    max_tool_calls: Optional[int] = Field(None, description="ignored: no tools")
    stream_options: Optional[dict[str, bool]] = Field(None, description="ignored (no obfuscation is added)")
    include: Optional[list[Literal["message.output_text.logprobs"]]] = Field(
        None, description="only message.output_text.logprobs: each answer token's log probability")
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, description="that many most likely tokens per position "
                                                                     "(turns logprobs on)")


# -- responses -------------------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose K/V came from the prefix cache (continuous "
                                           "batching; 0 with dynamic batching)")
    visual_tokens: int = Field(description="visual tokens of the images and frames (not in prompt_tokens)")
    image_tensors: int = Field(description="crops + global views + video frames")
    cached_visual_tokens: int = Field(description="visual tokens whose features came from the feature cache")
    cached_image_tensors: int = Field(0, description="extension: image tensors (crops, frames) whose visual K/V came "
                                                     "from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantReply(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantReply
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[Literal["stop", "length"]]


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed answer (the stream ends with `data: [DONE]`; an error after the first
    event comes as an ErrorResponse event)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[Literal["stop", "length"]]


class Completion(BaseModel):
    """A legacy completion; streamed, each `data:` event is one too (text pieces, then one with a
    finish_reason, then with stream_options.include_usage one with `usage` and no choices, then [DONE])."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int
    cache_write_tokens: int
    visual_tokens: int = Field(description="visual tokens of the images (not in input_tokens)")
    image_tensors: int
    cached_visual_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class Response(BaseModel):
    """A response object (`incomplete` when max_output_tokens or the context ended the answer)."""

    id: str
    object: Literal["response"]
    created_at: int
    completed_at: Optional[int]
    status: Literal["in_progress", "completed", "incomplete"]
    error: None
    incomplete_details: Optional[IncompleteDetails]
    instructions: Optional[str]
    max_output_tokens: Optional[int]
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool
    previous_response_id: Optional[str]
    store: bool
    temperature: float
    top_p: float
    text: dict[str, Any]
    tool_choice: Literal["none"]
    tools: list[Any]
    truncation: Literal["disabled"]
    usage: Optional[ResponseUsage]
    metadata: dict[str, str]
    top_logprobs: Optional[int] = None


class _Event(BaseModel):
    sequence_number: int


class ResponseLifecycleEvent(_Event):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete"]
    response: Response


class OutputItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputMessage


class ContentPartEvent(_Event):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(_Event):
    type: Literal["response.output_text.delta"]
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any]


class TextDoneEvent(_Event):
    type: Literal["response.output_text.done"]
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any]


class ErrorEvent(_Event):
    type: Literal["error"]
    message: str
    code: Optional[str]
    param: Optional[str]


class ResponseStreamEvent(RootModel[Annotated[Union[ResponseLifecycleEvent, OutputItemEvent, ContentPartEvent,
                                                    TextDeltaEvent, TextDoneEvent, ErrorEvent],
                                              Field(discriminator="type")]]):
    """One server-sent event of a streamed response (`event: <type>` and `data: <this>`)."""


# -- the document ----------------------------------------------------------------------------------------

ERROR_STATUSES = {400: "malformed request, a value the request cannot have, or a parameter this server does "
                       "not implement (code unsupported_parameter) or know (unknown_parameter)",
                  401: "missing or wrong API key", 403: "a media URL this server does not fetch",
                  404: "unknown model (or stored response)", 413: "body or media too large",
                  415: "unsupported content part or media type",
                  422: "a value out of range", 429: "the request queue is full (see Retry-After)",
                  500: "an internal error (the server keeps serving)"}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries of a route for these error statuses."""
    return {s: {"model": ErrorResponse, "description": ERROR_STATUSES[s]} for s in statuses}


def _sse_schema(*events: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1: `schema` describes each event): its `data` is one of `events`."""
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": list(events)}}}


def _json_event(*names: str) -> dict[str, Any]:
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": f"#/components/schemas/{n}"} for n in names]}}


_ALL_ERRORS = errors(400, 401, 403, 404, 413, 415, 422, 429, 500)

CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ChatCompletion, "description": "the answer; with `stream: true`, server-sent events "
                                                  "(`data: <ChatCompletionChunk>` ... `data: [DONE]`)",
          "content": {"text/event-stream": {"schema": _sse_schema(
              {"const": "[DONE]"}, _json_event("ChatCompletionChunk", "ErrorResponse"))}}},
    **_ALL_ERRORS,
}

COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Completion, "description": "the answer; with `stream: true`, server-sent events "
                                              "(`data: <Completion>` ... `data: [DONE]`)",
          "content": {"text/event-stream": {"schema": _sse_schema(
              {"const": "[DONE]"}, _json_event("Completion", "ErrorResponse"))}}},
    **_ALL_ERRORS,
}

RESPONSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Response, "description": "the response; with `stream: true`, server-sent events "
                                            "(`event: <type>` + `data: <ResponseStreamEvent>`)",
          "content": {"text/event-stream": {"schema": _sse_schema(_json_event("ResponseStreamEvent"))}}},
    **_ALL_ERRORS,
}

# The routes read raw bodies, so FastAPI cannot see these: openapi() adds them, with the server's own limit
# (--max-tokens-limit) on the fields that ask for tokens.
REQUEST_BODIES: dict[str, tuple[type[BaseModel], tuple[str, ...]]] = {
    "/v1/chat/completions": (ChatCompletionRequest, ("max_tokens", "max_completion_tokens")),
    "/v1/completions": (CompletionRequest, ("max_tokens",)),
    "/v1/responses": (ResponseRequest, ("max_output_tokens",)),
}


def openapi(app: Any, max_tokens_limit: int) -> dict[str, Any]:
    """FastAPI's document plus the request bodies (the routes read raw bodies, so FastAPI cannot see them)."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="OpenAI-compatible chat completions, completions and responses for one mPLUG-Owl "
                                  "model")
    models = [(m, "validation") for m, _ in REQUEST_BODIES.values()]
    models += [(m, "serialization") for m in (ChatCompletionChunk, Completion, ResponseStreamEvent)]
    _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs["$defs"])
    for path, (model, limited) in REQUEST_BODIES.items():
        if path not in doc["paths"]:
            continue
        for name in limited:
            schemas[model.__name__]["properties"][name]["anyOf"][0]["maximum"] = max_tokens_limit
        doc["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    app.openapi_schema = doc
    return doc
