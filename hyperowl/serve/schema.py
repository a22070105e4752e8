"""The published wire models: request and response bodies of the API as pydantic models, for /openapi.json.

Design note: these models *describe* the API (shaped as the OpenAI specification describes chat
completions, models and errors, plus our extensions) so that generated clients and fuzzers can use it. They
do not parse requests: protocol.py's parser does, because it turns every mistake into *one* OpenAI-style
error naming the field with a fitting status (FastAPI's default would be a 422 listing pydantic's errors).
The two are kept in agreement by tests/test_serve_fuzz.py: schemathesis generates bodies from this schema
and sends them to the real server, and a body the schema allows must be answered 200 or refused only for
what a schema cannot say (the context length, media content, message order).

`openapi(app, config)` builds the document: FastAPI's own (routes, the response models given with each
route) plus the request body, whose model lives only here since the routes read raw bodies.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from ..limits import SEED_RANGE
from .protocol import MAX_STOP_STRINGS


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send many optional fields: ignored, not refused


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


class ChatCompletionRequest(_Open):
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
    top_k: Optional[int] = Field(None, ge=-1, description="extension: 0 or -1 = off")
    repetition_penalty: Optional[float] = Field(None, gt=0, description="extension (HF rule)")
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Union[Annotated[str, Field(min_length=1)],
                Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)], None] = None
    n: Optional[int] = Field(None, ge=1, le=1)


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
    logprobs: None
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
    logprobs: None
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


# -- the document ----------------------------------------------------------------------------------------

ERROR_STATUSES = {400: "malformed request or a value the request cannot have",
                  401: "missing or wrong API key", 403: "a media URL this server does not fetch",
                  404: "unknown model", 413: "body or media too large", 415: "unsupported content part or media type",
                  422: "a value out of range", 429: "the request queue is full (see Retry-After)",
                  500: "an internal error (the server keeps serving)"}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries of a route for these error statuses."""
    return {s: {"model": ErrorResponse, "description": ERROR_STATUSES[s]} for s in statuses}


CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ChatCompletion, "description": "the answer; with `stream: true`, server-sent events "
                                                  "(`data: <ChatCompletionChunk>` ... `data: [DONE]`)",
          "content": {"text/event-stream": {"schema": {  # one event (OpenAPI 3.1: `schema` describes each event)
              "type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
                  {"const": "[DONE]"},
                  {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
                      {"$ref": "#/components/schemas/ChatCompletionChunk"},
                      {"$ref": "#/components/schemas/ErrorResponse"}]}}]}}}}}},
    **errors(400, 401, 403, 404, 413, 415, 422, 429, 500),
}


def openapi(app: Any, max_tokens_limit: int) -> dict[str, Any]:
    """FastAPI's document plus the chat request body (the routes read raw bodies, so FastAPI cannot see it)."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="OpenAI-compatible chat completions for one mPLUG-Owl model")
    _, defs = models_json_schema([(ChatCompletionRequest, "validation"), (ChatCompletionChunk, "serialization")],
                                 ref_template="#/components/schemas/{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs["$defs"])
    for name in ("max_tokens", "max_completion_tokens"):  # the server's own limit (--max-tokens-limit)
        schemas["ChatCompletionRequest"]["properties"][name]["anyOf"][0]["maximum"] = max_tokens_limit
    post = doc["paths"]["/v1/chat/completions"]["post"]
    post["requestBody"] = {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}
    app.openapi_schema = doc
    return doc
