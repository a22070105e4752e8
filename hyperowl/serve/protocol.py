"""OpenAI chat-completions wire format: request validation, response and chunk bodies, API errors.

Design note: the request body is validated by hand rather than with a pydantic model so that every
mistake becomes *one* OpenAI-style error naming the offending field (`param`) with a fitting status (the
pydantic models in schema.py only publish the wire format in /openapi.json; a fuzz test keeps the two agreed):
400 when the request cannot be understood (malformed JSON, wrong types, missing fields), 422 when it is
understood but a value is out of range, 404 for an unknown model, 415 for a content part type or media type
we do not handle. Unknown top-level fields are ignored, as OpenAI clients send many optional ones.
Content parts are kept in order; the prompt builder turns each media part into a placeholder.

Extensions beyond OpenAI (also understood by vLLM): `top_k`, `repetition_penalty`, `min_tokens`.

`seed` must lie in [-2**63, 2**64 - 1] (what a 64-bit generator takes; a negative seed s is the same
generator as 2**64 - 1 + s, torch's rule); anything outside is refused (422), never reduced, so that one
seed always means one answer. Fields that depend on the model (prompt + max_tokens within its context) are
checked in app.py once the prompt is tokenized, still before the request joins a batch.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from ..limits import SEED_RANGE

MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _default_type(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _default_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class MediaPart:
    kind: Literal["image", "video"]
    url: str
    param: str  # where it was in the request, for error messages, e.g. messages[0].content[1]


@dataclass
class Message:
    role: str
    parts: list[TextPart | MediaPart]


@dataclass
class ChatRequest:
    model: str
    messages: list[Message]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def media(self) -> list[MediaPart]:
        return [p for m in self.messages for p in m.parts if isinstance(p, MediaPart)]


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None
    except RecursionError:  # the C parser recurses per nesting level: ~1000 levels exhaust the stack
        raise ApiError(400, "request body nests JSON arrays/objects too deeply; a chat request needs a few levels",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


def _typed(body: dict, name: str, types: type | tuple[type, ...], default: Any, what: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int subclass: `"max_tokens": true` is a type error, not 1.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"'{name}' must be {what}, got a boolean", param=name, code="invalid_type")
    wanted = types if isinstance(types, tuple) else (types,)
    if isinstance(value, float) and int in wanted and float not in wanted and value.is_integer():
        return int(value)  # JSON has numbers, not integers: 3.0 is the integer 3 (as JSON Schema says)
    if not isinstance(value, types):
        raise ApiError(400, f"'{name}' must be {what}, got {type(value).__name__}", param=name, code="invalid_type")
    return value


def _range(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ApiError(422, f"'{name}' {msg}", param=name, code="invalid_value")


_MEDIA_PARTS = {"image_url": "image", "video_url": "video"}


def _parse_part(part: Any, param: str, role: str) -> TextPart | MediaPart:
    if isinstance(part, str):  # OpenAI refuses it too: a list holds part objects, a bare string is `content` itself
        raise ApiError(400, f"{param} is a bare string; inside a content list write {{\"type\": \"text\", \"text\": "
                            "...}", param=param, code="invalid_type")
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise ApiError(400, f"{param} must be an object with a 'type'", param=param, code="invalid_type")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"{param}.text must be a string", param=f"{param}.text", code="invalid_type")
        return TextPart(part["text"])
    if kind in _MEDIA_PARTS:
        if role != "user":
            raise ApiError(400, f"{param}: images and videos are only accepted in user messages", param=param)
        inner = part.get(kind)
        url = inner.get("url") if isinstance(inner, dict) else inner  # {"url": ...} (OpenAI) or a bare string
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{param}.{kind}.url must be a non-empty string", param=f"{param}.{kind}.url",
                           code="invalid_type")
        return MediaPart(_MEDIA_PARTS[kind], url, param)
    raise ApiError(415, f"{param}: content part type {kind!r} is not supported; use 'text', 'image_url' or 'video_url'",
                   param=f"{param}.type", code="unsupported_content_type")


def _parse_messages(raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages",
                       code="invalid_type")
    out = []
    for i, m in enumerate(raw):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{p} must be an object", param=p, code="invalid_type")
        role = m.get("role")
        if role == "developer":  # newer OpenAI clients' name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{p}.role must be 'system', 'user' or 'assistant', got {role!r}", param=f"{p}.role",
                           code="invalid_value")
        if role == "system" and i != 0:
            raise ApiError(400, f"{p}: a system message is only allowed first", param=p, code="invalid_value")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            parts: list[TextPart | MediaPart] = [TextPart(content)]
        elif isinstance(content, list):
            parts = [_parse_part(part, f"{p}.content[{j}]", role) for j, part in enumerate(content)]
        else:
            raise ApiError(400, f"{p}.content must be a string or a list of content parts", param=f"{p}.content",
                           code="invalid_type")
        out.append(Message(role, parts))
    if out[-1].role == "assistant":
        raise ApiError(400, "the last message must be a user (or system) message: there is nothing to answer",
                       param=f"messages[{len(out) - 1}]", code="invalid_value")
    return out


def parse_chat_request(body: dict[str, Any], model_name: str, max_tokens_limit: int) -> ChatRequest:
    """Validate a decoded chat-completions body (see the module note for the status codes)."""
    model = _typed(body, "model", str, model_name, "a string")
    if model != model_name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {model_name!r} (see GET /v1/models)",
                       param="model", code="model_not_found")
    if "messages" not in body:
        raise ApiError(400, "missing required field 'messages'", param="messages", code="missing_field")
    messages = _parse_messages(body["messages"])
    n = _typed(body, "n", int, 1, "an integer")
    _range(n == 1, "n", "must be 1: one answer per request")
    max_tokens = _typed(body, "max_completion_tokens", int, None, "an integer")
    max_tokens = _typed(body, "max_tokens", int, max_tokens, "an integer")
    if max_tokens is not None:
        _range(1 <= max_tokens <= max_tokens_limit, "max_tokens", f"must be between 1 and {max_tokens_limit}")
    min_tokens = _typed(body, "min_tokens", int, 0, "an integer")
    _range(min_tokens >= 0, "min_tokens", "must be >= 0")
    if max_tokens is not None:
        _range(min_tokens <= max_tokens, "min_tokens", f"({min_tokens}) must not exceed max_tokens ({max_tokens})")
    temperature = float(_typed(body, "temperature", (int, float), 0.0, "a number"))
    _range(0.0 <= temperature <= 2.0, "temperature", "must be between 0 and 2")
    top_p = float(_typed(body, "top_p", (int, float), 1.0, "a number"))
    _range(0.0 < top_p <= 1.0, "top_p", "must be in (0, 1]")
    top_k = _typed(body, "top_k", int, 0, "an integer")
    top_k = 0 if top_k == -1 else top_k  # vLLM spells "off" as -1
    _range(top_k >= 0, "top_k", "must be >= 0 (0 or -1 = off)")
    rep = float(_typed(body, "repetition_penalty", (int, float), 1.0, "a number"))
    _range(rep > 0, "repetition_penalty", "must be > 0")
    seed = _typed(body, "seed", int, None, "an integer")
    if seed is not None:
        _range(SEED_RANGE[0] <= seed <= SEED_RANGE[1], "seed",
               f"must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} (64 bits), got {seed}")
    stop_raw = _typed(body, "stop", (str, list), [], "a string or a list of strings")
    stop = [stop_raw] if isinstance(stop_raw, str) else stop_raw
    if not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of non-empty strings", param="stop", code="invalid_type")
    _range(len(stop) <= MAX_STOP_STRINGS, "stop", f"may hold at most {MAX_STOP_STRINGS} strings")
    stream = _typed(body, "stream", bool, False, "a boolean")
    opts = _typed(body, "stream_options", dict, {}, "an object")
    include_usage = bool(opts.get("include_usage", False))
    return ChatRequest(model=model, messages=messages, stream=stream, include_usage=include_usage,
                       max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       repetition_penalty=rep, stop=list(stop), seed=seed)


# -- responses -------------------------------------------------------------------------------------------

def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(cid: str, model: str, created: int, text: str, finish_reason: str, usage: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage}


def chunk_body(cid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
               usage: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage_body(prompt_tokens: int, completion_tokens: int, visual_tokens: int, image_tensors: int,
               cached_visual_tokens: int, cached_tokens: int = 0, cached_images: int = 0) -> dict:
    """`prompt_tokens` counts the text sequence (one placeholder token per image tensor included); visual
    tokens never enter that sequence, so they are reported apart (image tensors = crops + global views +
    video frames, each `tokens_per_image` visual tokens), with how many came from the feature cache.
    `cached_tokens` (OpenAI's field): prompt tokens whose K/V came from the engine's prefix cache;
    `cached_image_tensors` (ours): image tensors (crops, frames) whose visual K/V did."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens, "visual_tokens": visual_tokens,
                                      "image_tensors": image_tensors, "cached_visual_tokens": cached_visual_tokens,
                                      "cached_image_tensors": cached_images}}


def now() -> int:
    return int(time.time())
