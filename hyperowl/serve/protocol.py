"""OpenAI wire format: request validation (chat completions, legacy completions, the Responses API), chat response
and chunk bodies, API errors.

Design note: the request body is validated by hand rather than with a pydantic model so that every
mistake becomes *one* OpenAI-style error naming the offending field (`param`) with a fitting status (the
pydantic models in schema.py only publish the wire format in /openapi.json; a fuzz test keeps the two agreed):
400 when the request cannot be understood (malformed JSON, wrong types, missing fields), 422 when it is
understood but a value is out of range, 404 for an unknown model, 415 for a content part type or media type
we do not handle. Content parts are kept in order; the prompt builder turns each media part into a placeholder.

Never silently ignored: every top-level field of a request is either parsed (and honoured), ignored by design
(bookkeeping for the caller that cannot change the answer: `user`, `metadata`, ...), or refused with a 400
`unsupported_parameter` naming it unless it holds its neutral value (`n: 1`, `logprobs: false`, ...); a field
the endpoint does not know is a 400 `unknown_parameter`. The tables are `CHAT_FIELDS`, `COMPLETION_FIELDS` and
`RESPONSE_FIELDS` below: turning a feature on (logprobs, n, response_format) is moving its row from
`refused` to `parsed` and reading it in the parser.

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
from typing import Any, Callable, Literal

from ..limits import SEED_RANGE

MAX_STOP_STRINGS = 4
MAX_N = 8  # choices per chat request (each one a row of the batch)
MAX_TOP_LOGPROBS = 20  # OpenAI's bound (the engine's MAX_LOGPROBS)
MAX_TOP_K = 2**31 - 1  # the engine makes a tensor of it: a top_k past int64 was a 500 (found by the fuzz test)


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
    param: str | None = None  # where it was in the request when not messages[i] (the Responses API's input[i])
    # An assistant message this server generated (a stored response): its answer's exact token ids, planned in
    # place of its text (processing/plan.py, exact answer ids). Never taken from a client.
    ids: list[int] | None = None


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
    input_param: str = "messages"  # the request field holding the prompt (for error messages)
    logprobs: int | None = None  # None: no logprobs; n: each token's logprob and its n most likely alternatives
    json_schema: Any = None  # None: free text; a JSON schema (dict) or "json_object": grammar-constrained answer
    n: int = 1  # choices (chat); choice i is seeded seed + i

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


# -- which fields each endpoint honours --------------------------------------------------------------------

@dataclass(frozen=True)
class Refused:
    """A field this server does not implement: accepted only with its neutral value (None always is)."""

    neutral: Callable[[Any], bool]
    hint: str  # what the client can do instead


def _is(*values: Any) -> Callable[[Any], bool]:
    # type-strict equality: `True == 1` in Python, but `"n": true` is not n = 1
    return lambda v: any(type(v) is type(x) and v == x or (type(x) is int and type(v) is float and v == x)
                         for x in values)


@dataclass(frozen=True)
class Fields:
    endpoint: str
    parsed: frozenset[str]  # read by the parser and honoured
    ignored: frozenset[str]  # accepted, by design without effect on the answer (documented)
    refused: dict[str, Refused]  # not implemented: a 400 naming the field unless its value is neutral

    def check(self, body: dict[str, Any]) -> None:
        """A 400 for the first unknown field, else for the unsupported ones (all named, `param` the first)."""
        refused = []
        for name, value in body.items():
            if name in self.parsed or name in self.ignored:
                continue
            rule = self.refused.get(name)
            if rule is None:
                raise ApiError(400, f"unknown parameter {name!r} for {self.endpoint} (this server reads "
                                    f"{', '.join(sorted(self.parsed | self.ignored))})", param=name,
                               code="unknown_parameter")
            if value is not None and not rule.neutral(value):
                refused.append((name, rule.hint))
        if refused:
            what = "; ".join(f"{name!r}: {hint}" for name, hint in refused)
            raise ApiError(400, f"not supported by this server: {what}", param=refused[0][0],
                           code="unsupported_parameter")


# Extensions beyond OpenAI (vLLM reads them too), parsed on every generating endpoint.
EXTENSIONS = frozenset({"top_k", "repetition_penalty", "min_tokens"})
# Bookkeeping and routing hints of the caller: no effect on an answer by their OpenAI definition.
BOOKKEEPING = frozenset({"user", "metadata", "safety_identifier", "service_tier", "prompt_cache_key",
                         "prompt_cache_retention"})
_NO_TOOLS = "tool and function calling is not implemented; leave it out"
_PENALTY = "only 0 is accepted; use the extension 'repetition_penalty' (the Hugging Face rule) instead"

CHAT_FIELDS = Fields(
    "POST /v1/chat/completions",
    parsed=frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                      "temperature", "top_p", "seed", "stop", "logprobs", "top_logprobs", "response_format", "n"})
    | EXTENSIONS,
    ignored=BOOKKEEPING | {"store", "parallel_tool_calls"},  # parallel_tool_calls means nothing without tools
    refused={
        "tools": Refused(_is([]), _NO_TOOLS),
        "tool_choice": Refused(_is("none"), _NO_TOOLS),
        "functions": Refused(_is([]), _NO_TOOLS),
        "function_call": Refused(_is("none"), _NO_TOOLS),
        "logit_bias": Refused(_is({}), "token biases are not implemented; leave it out"),
        "frequency_penalty": Refused(_is(0), _PENALTY),
        "presence_penalty": Refused(_is(0), _PENALTY),
        "audio": Refused(lambda v: False, "audio output is not implemented: answers are text"),
        "modalities": Refused(_is(["text"]), "answers are text only"),
        "prediction": Refused(lambda v: False, "predicted outputs are not implemented; leave it out"),
        "reasoning_effort": Refused(lambda v: False, "the model has no reasoning-effort setting; leave it out"),
        "verbosity": Refused(lambda v: False, "the model has no verbosity setting; leave it out"),
        "web_search_options": Refused(lambda v: False, "web search is not available; leave it out"),
        "moderation": Refused(lambda v: False, "moderation is not available; leave it out"),
        "prompt_cache_options": Refused(lambda v: False, "prompt-cache options are not implemented; leave it out"),
    })

COMPLETION_FIELDS = Fields(
    "POST /v1/completions",
    parsed=frozenset({"model", "prompt", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed",
                      "stop", "logprobs", "n", "best_of"}) | EXTENSIONS,
    ignored=frozenset({"user"}),
    refused={
        "echo": Refused(_is(False), "echoing the prompt is not implemented; prepend it yourself"),
        "suffix": Refused(_is(""), "insertion (a suffix) is not implemented; leave it out"),
        "logit_bias": Refused(_is({}), "token biases are not implemented; leave it out"),
        "frequency_penalty": Refused(_is(0), _PENALTY),
        "presence_penalty": Refused(_is(0), _PENALTY),
    })

RESPONSE_FIELDS = Fields(
    "POST /v1/responses",
    parsed=frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream",
                      "previous_response_id", "store", "metadata", "seed", "stop", "text", "include",
                      "top_logprobs"}) | EXTENSIONS,
    # stream_options holds only include_obfuscation (padding against length side channels): never added here
    ignored=BOOKKEEPING | {"parallel_tool_calls", "max_tool_calls", "stream_options"},
    refused={
        "tools": Refused(_is([]), _NO_TOOLS),
        "tool_choice": Refused(_is("none"), _NO_TOOLS),
        "reasoning": Refused(lambda v: False, "the model has no reasoning settings; leave it out"),
        "background": Refused(_is(False), "background responses are not implemented; stream instead"),
        "truncation": Refused(_is("disabled"), "the input is never truncated: a prompt over the context is a 400"),
        "conversation": Refused(lambda v: False, "conversations are not stored; use previous_response_id"),
        "prompt": Refused(lambda v: False, "prompt templates are not available; send input"),
        "context_management": Refused(lambda v: False, "context management is not implemented; leave it out"),
        "image": Refused(lambda v: False, "image generation is not available; leave it out"),
        "moderation": Refused(lambda v: False, "moderation is not available; leave it out"),
        "access_programs": Refused(lambda v: False, "not available; leave it out"),
        "background_options": Refused(lambda v: False, "background responses are not implemented; leave it out"),
        "prompt_cache_options": Refused(lambda v: False, "prompt-cache options are not implemented; leave it out"),
    })


def _check_model(body: dict[str, Any], model_name: str) -> str:
    model = _typed(body, "model", str, model_name, "a string")
    if model != model_name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {model_name!r} (see GET /v1/models)",
                       param="model", code="model_not_found")
    return model


def _max_tokens(body: dict[str, Any], name: str, limit: int, default: int | None = None) -> int | None:
    value = _typed(body, name, int, default, "an integer")
    if value is not None:
        _range(1 <= value <= limit, name, f"must be between 1 and {limit}")
    return value


def _sampling(body: dict[str, Any], max_tokens: int | None, max_name: str) -> dict[str, Any]:
    """The sampling fields every generating endpoint shares (ChatRequest's names), validated."""
    min_tokens = _typed(body, "min_tokens", int, 0, "an integer")
    _range(min_tokens >= 0, "min_tokens", "must be >= 0")
    if max_tokens is not None:
        _range(min_tokens <= max_tokens, "min_tokens", f"({min_tokens}) must not exceed {max_name} ({max_tokens})")
    temperature = float(_typed(body, "temperature", (int, float), 0.0, "a number"))
    _range(0.0 <= temperature <= 2.0, "temperature", "must be between 0 and 2")
    top_p = float(_typed(body, "top_p", (int, float), 1.0, "a number"))
    _range(0.0 < top_p <= 1.0, "top_p", "must be in (0, 1]")
    top_k = _typed(body, "top_k", int, 0, "an integer")
    top_k = 0 if top_k == -1 else top_k  # vLLM spells "off" as -1
    _range(0 <= top_k <= MAX_TOP_K, "top_k", f"must be between 0 and {MAX_TOP_K} (0 or -1 = off)")
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
    return dict(max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                repetition_penalty=rep, stop=list(stop), seed=seed)


def _schema_of(fmt: Any, param: str, flat: bool) -> Any:
    """OpenAI's response format object -> None (text), "json_object" or the JSON schema (dict). Chat nests the
    schema ({"type": "json_schema", "json_schema": {"name", "schema", "strict"}}), Responses' text.format does not
    (flat: {"type": "json_schema", "name", "schema", "strict"})."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, f"'{param}' must be an object with type 'text', 'json_object' or 'json_schema'",
                       param=param, code="invalid_value")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return "json_object"
    inner = fmt if flat else fmt.get("json_schema")
    where = param if flat else f"{param}.json_schema"
    if not isinstance(inner, dict) or not isinstance(inner.get("schema", {}), dict):
        raise ApiError(400, f"'{where}' must be an object with a 'schema' object", param=where, code="invalid_value")
    return inner.get("schema") or {"type": "object"}


def _include_usage(body: dict[str, Any]) -> bool:
    opts = _typed(body, "stream_options", dict, {}, "an object")
    return bool(opts.get("include_usage", False))


def parse_chat_request(body: dict[str, Any], model_name: str, max_tokens_limit: int) -> ChatRequest:
    """Validate a decoded chat-completions body (see the module note for the status codes)."""
    model = _check_model(body, model_name)
    if "messages" not in body:
        raise ApiError(400, "missing required field 'messages'", param="messages", code="missing_field")
    messages = _parse_messages(body["messages"])
    CHAT_FIELDS.check(body)
    max_tokens = _max_tokens(body, "max_completion_tokens", max_tokens_limit)
    max_tokens = _max_tokens(body, "max_tokens", max_tokens_limit, max_tokens)
    stream = _typed(body, "stream", bool, False, "a boolean")
    logprobs = _typed(body, "logprobs", bool, False, "a boolean")
    top = _typed(body, "top_logprobs", int, None, "an integer")
    if top is not None:
        _range(0 <= top <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
        if not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    n = _typed(body, "n", int, 1, "an integer")
    _range(1 <= n <= MAX_N, "n", f"must be between 1 and {MAX_N}")
    return ChatRequest(model=model, messages=messages, stream=stream, include_usage=_include_usage(body),
                       logprobs=(top or 0) if logprobs else None, n=n,
                       json_schema=_schema_of(body.get("response_format"), "response_format", flat=False),
                       **_sampling(body, max_tokens, "max_tokens"))


@dataclass
class CompletionRequest:
    """POST /v1/completions: a raw prompt (no chat template), text out."""

    model: str
    prompt: str
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = 16  # OpenAI's default for this endpoint
    min_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    input_param: str = "prompt"
    logprobs: int | None = None
    json_schema: Any = None
    n: int = 1  # choices returned; each one a job (submit), choice i seeded seed + i
    best_of: int | None = None  # candidates made (>= n, not streamed); the n best by mean token logprob are returned


COMPLETION_DEFAULT_MAX_TOKENS = 16


def parse_completion_request(body: dict[str, Any], model_name: str, max_tokens_limit: int) -> CompletionRequest:
    model = _check_model(body, model_name)
    if "prompt" not in body:
        raise ApiError(400, "missing required field 'prompt'", param="prompt", code="missing_field")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ApiError(400, "'prompt' as token ids is not supported; send the prompt as text", param="prompt",
                       code="unsupported_parameter")
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, f"'prompt' holds {len(prompt)} prompts; send one prompt per request", param="prompt",
                       code="unsupported_parameter")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string (or a list of one string)", param="prompt",
                       code="invalid_type")
    COMPLETION_FIELDS.check(body)
    max_tokens = _max_tokens(body, "max_tokens", max_tokens_limit, COMPLETION_DEFAULT_MAX_TOKENS)
    stream = _typed(body, "stream", bool, False, "a boolean")
    logprobs = _typed(body, "logprobs", int, None, "an integer")
    if logprobs is not None:
        _range(0 <= logprobs <= 5, "logprobs", "must be between 0 and 5")  # OpenAI's bound for this endpoint
    n = _typed(body, "n", int, 1, "an integer")
    _range(1 <= n <= MAX_N, "n", f"must be between 1 and {MAX_N}")
    best_of = _typed(body, "best_of", int, None, "an integer")
    if best_of is not None:
        _range(n <= best_of <= MAX_N, "best_of", f"must be between n ({n}) and {MAX_N}")
        if stream and best_of > n:
            raise ApiError(400, "'best_of' above n cannot be streamed (the best are known only at the end); drop "
                                "stream or best_of", param="best_of", code="invalid_value")
    return CompletionRequest(model=model, prompt=prompt, stream=stream, include_usage=_include_usage(body),
                             logprobs=logprobs, n=n, best_of=best_of if best_of and best_of > n else None,
                             **_sampling(body, max_tokens, "max_tokens"))


@dataclass
class ResponseRequest:
    """POST /v1/responses, validated: `chat` is the conversation to answer (instructions, the stored history of
    `previous_response_id`, then this input), built by the caller once the history is looked up."""

    model: str
    input: list[Message]  # this request's own input messages
    instructions: str | None
    previous_response_id: str | None
    store: bool
    metadata: dict[str, str] | None
    stream: bool
    sampling: dict[str, Any]

    def chat(self, history: list[Message]) -> ChatRequest:
        system = [Message("system", [TextPart(self.instructions)], "instructions")] if self.instructions else []
        messages = system + history + self.input
        for i, m in enumerate(messages):  # the checks chat messages get, on the joined conversation
            if m.role == "system" and i:
                where = m.param or f"input[{i}]"
                raise ApiError(400, f"{where}: a system (or developer) message is only allowed first, and not beside "
                                    "'instructions'", param=where, code="invalid_value")
        return ChatRequest(model=self.model, messages=messages, stream=self.stream, input_param="input",
                           **self.sampling)


_INPUT_PARTS = {"input_text": "text", "output_text": "text", "input_image": "image"}


def _parse_input_part(part: Any, param: str, role: str) -> TextPart | MediaPart:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise ApiError(400, f"{param} must be an object with a 'type'", param=param, code="invalid_type")
    kind = _INPUT_PARTS.get(part["type"])
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"{param}.text must be a string", param=f"{param}.text", code="invalid_type")
        return TextPart(part["text"])
    if kind == "image":
        if role != "user":
            raise ApiError(400, f"{param}: images are only accepted in user messages", param=param)
        if part.get("file_id") is not None:
            raise ApiError(400, f"{param}.file_id: uploaded files are not available; send image_url (a data: or "
                                "http(s) URL)", param=f"{param}.file_id", code="unsupported_parameter")
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{param}.image_url must be a non-empty string", param=f"{param}.image_url",
                           code="invalid_type")
        return MediaPart("image", url, param)
    raise ApiError(415, f"{param}: content part type {part['type']!r} is not supported; use 'input_text' or "
                        "'input_image'", param=f"{param}.type", code="unsupported_content_type")


def _parse_input(raw: Any) -> list[Message]:
    if isinstance(raw, str):
        return [Message("user", [TextPart(raw)], "input")]
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'input' must be a string or a non-empty list of messages", param="input",
                       code="invalid_type")
    out = []
    for i, m in enumerate(raw):
        p = f"input[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{p} must be an object", param=p, code="invalid_type")
        if (m.get("type") or "message") != "message":
            raise ApiError(400, f"{p}: input items of type {m.get('type')!r} are not supported; send messages "
                                "({role, content})", param=f"{p}.type", code="unsupported_parameter")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{p}.role must be 'user', 'assistant', 'system' or 'developer', got "
                                f"{m.get('role')!r}", param=f"{p}.role", code="invalid_value")
        content = m.get("content")
        if isinstance(content, str):
            parts: list[TextPart | MediaPart] = [TextPart(content)]
        elif isinstance(content, list):
            parts = [_parse_input_part(part, f"{p}.content[{j}]", role) for j, part in enumerate(content)]
        else:
            raise ApiError(400, f"{p}.content must be a string or a list of content parts", param=f"{p}.content",
                           code="invalid_type")
        out.append(Message(role, parts, p))
    if out[-1].role == "assistant":
        raise ApiError(400, "the last input message must be a user (or system) message: there is nothing to answer",
                       param=f"input[{len(out) - 1}]", code="invalid_value")
    return out


LOGPROBS_INCLUDE = "message.output_text.logprobs"  # the one `include` value this server has data for


def _response_logprobs(body: dict[str, Any]) -> int | None:
    """`include: ["message.output_text.logprobs"]` and/or `top_logprobs` (0-20) -> the engine's logprobs (None: off).
    top_logprobs alone also turns them on: it would otherwise be ignored."""
    include = _typed(body, "include", list, [], "a list of strings")
    for i, value in enumerate(include):
        if not isinstance(value, str):
            raise ApiError(400, f"'include[{i}]' must be a string", param=f"include[{i}]", code="invalid_type")
        if value != LOGPROBS_INCLUDE:
            raise ApiError(400, f"'include' value {value!r} is not available from this server (it can include only "
                                f"{LOGPROBS_INCLUDE!r}); leave it out", param=f"include[{i}]",
                           code="unsupported_parameter")
    top = _typed(body, "top_logprobs", int, None, "an integer")
    if top is not None:
        _range(0 <= top <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
    return (top or 0) if top is not None or include else None


def parse_response_request(body: dict[str, Any], model_name: str, max_tokens_limit: int) -> ResponseRequest:
    model = _check_model(body, model_name)
    if "input" not in body:
        raise ApiError(400, "missing required field 'input'", param="input", code="missing_field")
    messages = _parse_input(body["input"])
    RESPONSE_FIELDS.check(body)
    instructions = _typed(body, "instructions", str, None, "a string")
    previous = _typed(body, "previous_response_id", str, None, "a string")
    metadata = _typed(body, "metadata", dict, None, "an object")
    if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
        raise ApiError(400, "'metadata' values must be strings", param="metadata", code="invalid_type")
    max_tokens = _max_tokens(body, "max_output_tokens", max_tokens_limit)
    text = _typed(body, "text", dict, {}, "an object")
    sampling = dict(_sampling(body, max_tokens, "max_output_tokens"),
                    json_schema=_schema_of(text.get("format"), "text.format", flat=True),
                    logprobs=_response_logprobs(body))
    return ResponseRequest(model=model, input=messages, instructions=instructions or None,
                           previous_response_id=previous, store=_typed(body, "store", bool, True, "a boolean"),
                           metadata=metadata, stream=_typed(body, "stream", bool, False, "a boolean"),
                           sampling=sampling)


# -- responses -------------------------------------------------------------------------------------------

def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(cid: str, model: str, created: int, text: str, finish_reason: str, usage: dict,
                    logprobs: list[dict] | None = None) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                         "finish_reason": finish_reason}],
            "usage": usage}


def chunk_body(cid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
               usage: dict | None = None, logprobs: list[dict] | None = None) -> dict:
    lp = None if logprobs is None else {"content": logprobs, "refusal": None}
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (the printable bytes stand for themselves, the others are shifted
    to 256 + n), as byte-level BPE vocabularies (Qwen2, the embedded model) spell their tokens."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


_BYTES = _byte_decoder()


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """A token's own bytes (a piece of a multi-byte character stays a piece, as OpenAI's `bytes` field shows)."""
    piece = tokenizer.id_to_token(token)
    if piece is None:
        return b""
    if tokenizer.get_added_tokens_decoder().get(token) is None and all(c in _BYTES for c in piece):
        return bytes(_BYTES[c] for c in piece)
    return tokenizer.decode([token], skip_special_tokens=False).encode()  # not byte-level (SentencePiece) or special


def logprob_entries(tokenizer: Any, lps: list[Any]) -> list[dict]:
    """Chat's logprobs.content: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]} per token."""
    def one(t: int, lp: float) -> dict:
        b = token_bytes(tokenizer, t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    return [dict(one(x.token, x.logprob), top_logprobs=[one(t, v) for t, v in x.top]) for x in lps]


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
