"""The HTTP server: an OpenAI-compatible chat-completions API and the web chat page, one FastAPI app (legacy
completions and the Responses API are routes of their own modules, completions.py and responses.py, built on
this module's request steps: prepare, submit, answer, finish).

Design note: a request goes through cheap checks first (API key, body size, JSON, fields, media count, a
full queue) so bad or excess requests cost almost nothing, then media are fetched (async), decoded and
tokenized in a worker thread (`asyncio.to_thread`, off the event loop), and the job is queued for the
scheduler's model thread. Answers stream back as token ids, detokenized here (`TextStream`) with stop
strings applied on the text: text that could be the beginning of a stop string is held back until it is
known not to be one, so a stop string never leaks to the client, and the engine row is cancelled at once.

A request is validated completely before it is queued (fields in protocol.py; media; the prompt plus
max_tokens within the model's context, `token_budget`), so a bad request never reaches a batch; what can
still fail inside a batch is isolated per row by the scheduler (scheduler.py).

Errors are OpenAI-shaped ({"error": {message, type, param, code}}). Every user mistake is an `ApiError`
with a 4xx status; anything else is a 500 `server_error` with the traceback in the log, and the process
keeps serving. A client that disconnects cancels its job (the stream generator's `finally`, or a
disconnect poll for non-streaming requests), which frees its batch row.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..chat import TextStream
from ..engine import SamplingParams
from ..limits import DEFAULT_FRAMES, MAX_MEDIA_BYTES, SEED_RANGE
from ..pipeline import Pipeline
from .live import add_live_routes
from .media import MediaLimits, resolve
from .prompt import PreparedPrompt, VisualOptions, build_prompt
from .protocol import (ApiError, ChatRequest, chunk_body, completion_body, logprob_entries, new_id, now,
                       parse_chat_request, parse_json, usage_body)
from .scheduler import ContinuousScheduler, Job, QueueFull, Scheduler, make_scheduler
from .schema import CHAT_RESPONSES, ModelList, errors, openapi
from .url_policy import UrlPolicy

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "hyperowl"
    api_key: str | None = None
    allowed_media_dir: Path | None = None
    allow_remote_media: bool = True
    media_url_policy: UrlPolicy = UrlPolicy()  # http(s) media: public addresses only by default (url_policy.py)
    max_images: int = 16  # image parts per request
    max_videos: int = 2  # video parts per request
    max_frames: int = DEFAULT_FRAMES
    fps: float | None = None
    cut: bool | None = None  # None: the processor's (checkpoint's) default
    max_media_bytes: int = MAX_MEDIA_BYTES  # hyperowl/limits.py: one definition for CLI and server
    max_body_bytes: int = 100 * 2**20
    fetch_timeout_s: float = 10.0
    max_queue: int = 64
    batching: str = "continuous"  # or "dynamic" (scheduler.py)
    kv_cache_gb: float | None = None  # continuous: the paged K/V budget (None: the engine's default from free memory)
    max_running: int = 64  # continuous: requests in the running batch
    prefill_chunk: int = 512  # continuous: prompt tokens per engine step (long prompts are read in chunks)
    prefix_cache: bool = True  # continuous: reuse the K/V of earlier requests' matching prefixes
    max_batch_size: int = 8
    max_padded_images: int = 32  # a batch pads at most this many image slots (see scheduler.py)
    batch_window_ms: float = 10.0
    feature_cache_mb: float = 512.0
    default_max_tokens: int = 512
    max_tokens_limit: int = 4096
    max_prompt_tokens: int = 32768
    retry_after_s: int = 1
    max_stored_responses: int = 256  # Responses API: answers kept for previous_response_id (LRU, responses.py)
    max_stored_response_mb: float = 64.0  # ... and the bytes their conversations may hold (data: URLs included)
    live_session_idle_s: float = 600.0  # a live session unused this long is freed (serve/live.py; 0 = never)


class StopText:
    """Token ids -> text deltas, cut at the first stop string (held back while a stop could still begin)."""

    def __init__(self, stream: TextStream, stops: list[str]) -> None:
        self.stream, self.stops = stream, stops
        self.text, self.sent = "", 0

    def push(self, token: int) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the answer)."""
        self.text += self.stream.push(token)
        if not self.stops:
            new, self.sent = self.text[self.sent:], len(self.text)
            return new, False
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            new, self.sent = self.text[self.sent:end], end
            return new, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(self.sent, len(self.text) - hold)
        new, self.sent = self.text[self.sent:end], end
        return new, False

    def flush(self) -> str:
        new, self.sent = self.text[self.sent:], len(self.text)
        return new


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@dataclass(frozen=True)
class AppState:
    """Everything the routes need for one loaded model; built once by `build_state`, kept on `app.state.serve`."""

    config: ServeConfig
    pipeline: Pipeline  # model + processor + this server's encoder (its feature cache) + the family row
    scheduler: Scheduler | ContinuousScheduler
    limits: MediaLimits
    visual: VisualOptions
    tokenizer: Any
    stops: tuple[int, ...]  # end-of-answer token ids (the family's)
    started: int  # unix time the app was built (the model's `created`)
    context: int | None = None  # the model's context in LLM rows (max_position_embeddings); None = unknown


@dataclass(frozen=True)
class Reply:
    """One accepted request on its way back: the queued job and what its answer is reported with."""

    job: Job
    req: ChatRequest
    prompt: PreparedPrompt
    cid: str
    created: int
    others: list[Job] = field(default_factory=list)  # choices 1..n-1 of a request with n > 1

    @property
    def jobs(self) -> list[Job]:
        return [self.job] + self.others


def build_state(model: Any, processor: Any, config: ServeConfig) -> AppState:
    """`model`: a `Pipeline` (from hyperowl.load) or a bare model; `processor`: None = the pipeline's."""
    given = model if isinstance(model, Pipeline) else None
    processor = processor if processor is not None or given is None else given.processor
    if processor is None:
        raise ValueError("serving needs a processor (a checkpoint with tokenizer.json)")
    # The server's own encoder: its feature cache is sized by --feature-cache-mb and shared by all requests.
    pipe = Pipeline(given.model, processor, family=given.family, checkpoint_dir=given.checkpoint_dir,
                    feature_cache_mb=config.feature_cache_mb) if given else \
        Pipeline(model, processor, feature_cache_mb=config.feature_cache_mb)
    kv_bytes = None if config.kv_cache_gb is None else int(config.kv_cache_gb * 2**30)
    scheduler = make_scheduler(pipe.model, pipe.encoder, config.batching, max_batch_size=config.max_batch_size,
                               batch_window_s=config.batch_window_ms / 1000, max_queue=config.max_queue,
                               max_padded_images=config.max_padded_images, kv_cache_bytes=kv_bytes,
                               max_running=config.max_running, prefill_chunk=config.prefill_chunk,
                               prefix_cache=config.prefix_cache)
    limits = MediaLimits(max_bytes=config.max_media_bytes, fetch_timeout_s=config.fetch_timeout_s,
                         allowed_dir=config.allowed_media_dir, allow_remote=config.allow_remote_media,
                         url_policy=config.media_url_policy)
    cut = processor.cut if config.cut is None else config.cut
    visual = VisualOptions(cut=cut, max_frames=config.max_frames, fps=config.fps)
    return AppState(config=config, pipeline=pipe, scheduler=scheduler, limits=limits, visual=visual,
                    tokenizer=processor.tokenizer, stops=pipe.stop_ids, started=now(),
                    context=getattr(pipe.model.config, "max_position_embeddings", None))


def state_of(request: Request) -> AppState:
    return request.app.state.serve


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.serve
    config = state.config
    state.scheduler.start()
    log.info("serving %s (%s batching, queue <= %d)", config.model_name, config.batching, config.max_queue)
    try:
        yield
    finally:
        state.scheduler.stop()


# --- exception handlers ---

async def api_error(request: Request, e: ApiError) -> JSONResponse:
    return _error_response(e)


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:  # 404/405 on routes
    return _error_response(ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))


async def client_gone(request: Request, e: ClientDisconnect) -> Response:
    # The client hung up while sending its body: nobody to answer, and not the server's fault.
    log.info("client disconnected while sending the request body to %s", request.url.path)
    return Response(status_code=499)


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return _error_response(ApiError(500, f"internal server error ({type(e).__name__})", code="internal_error"))


# --- request steps ---

def check_auth(state: AppState, request: Request) -> None:
    key = state.config.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def read_body(state: AppState, request: Request) -> bytes:
    limit = state.config.max_body_bytes
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"request body larger than {limit} bytes", code="payload_too_large")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:  # chunked uploads have no Content-Length: count as we read
            raise too_big
    return bytes(buf)


def too_busy(state: AppState) -> ApiError:
    return ApiError(429, "the server is busy: the request queue is full; retry shortly", code="queue_full",
                    headers={"Retry-After": str(state.config.retry_after_s)})


def check_media_count(config: ServeConfig, req: ChatRequest) -> None:
    n_img = sum(p.kind == "image" for p in req.media)
    n_vid = len(req.media) - n_img
    if n_img > config.max_images:
        raise ApiError(400, f"too many images: {n_img} (at most {config.max_images} per request)",
                       param=req.input_param, code="too_many_images")
    if n_vid > config.max_videos:
        raise ApiError(400, f"too many videos: {n_vid} (at most {config.max_videos} per request)",
                       param=req.input_param, code="too_many_videos")


async def prepare(state: AppState, req: ChatRequest) -> PreparedPrompt:
    """Request -> token ids and visual work: media fetched (async), decoded and tokenized in a worker thread."""
    config = state.config
    check_media_count(config, req)
    blobs = await asyncio.gather(*(resolve(p, state.limits) for p in req.media))
    prompt = await asyncio.to_thread(build_prompt, req, list(blobs), state.pipeline, state.visual)
    check_prompt_length(config, prompt, req.input_param)
    return prompt


def check_prompt_length(config: ServeConfig, prompt: PreparedPrompt, param: str) -> None:
    n = int(prompt.input_ids.numel())
    if n > config.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {n} tokens, more than this server's {config.max_prompt_tokens}",
                       param=param, code="context_length_exceeded")


def sequence_length(state: AppState, prompt: PreparedPrompt) -> int:
    """LLM rows the prompt takes: its token ids, each image placeholder widened to the family's rows per image."""
    rows = state.pipeline.family.llm_rows_per_image(state.pipeline.model.config)
    return int(prompt.input_ids.numel()) + prompt.image_tensors * (rows - 1)


def token_budget(state: AppState, req: ChatRequest, prompt: PreparedPrompt) -> int:
    """max_new_tokens for this request: prompt + answer must fit the model's context, checked before the
    request joins a batch (400 naming both numbers). Without max_tokens the answer may use what is left."""
    n, limit = sequence_length(state, prompt), state.context
    asked = req.max_tokens
    if limit is None:
        return asked or max(state.config.default_max_tokens, req.min_tokens)
    if asked is not None and n + asked > limit:
        name = {"input": "max_output_tokens"}.get(req.input_param, "max_tokens")
        raise ApiError(400, f"this model's context is {limit} tokens, but the prompt has {n} tokens and {name} "
                            f"asks for {asked} more ({n + asked}); shorten the {req.input_param} or lower {name}",
                       param=name, code="context_length_exceeded")
    if asked is not None:
        return asked
    room = limit - n
    if room < max(1, req.min_tokens):
        raise ApiError(400, f"this model's context is {limit} tokens, but the prompt has {n} tokens, leaving "
                            f"{max(room, 0)} for the answer (min_tokens {req.min_tokens}); shorten the "
                            f"{req.input_param}", param=req.input_param, code="context_length_exceeded")
    return min(max(state.config.default_max_tokens, req.min_tokens), room)


def sampling(state: AppState, req: ChatRequest, max_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                          repetition_penalty=req.repetition_penalty, stop_token_ids=state.stops,
                          min_new_tokens=min(req.min_tokens, max_new), seed=req.seed,
                          logprobs=getattr(req, "logprobs", None))


def constraint(state: AppState, req: Any) -> Any:
    """The request's grammar (response_format / text.format), compiled once per schema; None for free text."""
    schema = getattr(req, "json_schema", None)
    if schema is None:
        return None
    from ..structured import grammars_for

    try:
        return grammars_for(state.tokenizer, state.pipeline.model.config.vocab_size).constraint(schema, state.stops)
    except ImportError as e:
        raise ApiError(400, f"structured outputs are not installed on this server ({e})", code="unsupported_parameter")
    except ValueError as e:
        raise ApiError(400, f"response format: {e}", param="response_format", code="invalid_value") from None


async def answer(state: AppState, job: Job, req: ChatRequest) -> AsyncIterator[tuple[str, str | None, int]]:
    """(text delta, finish_reason or None, completion tokens so far) until the answer ends."""
    text = StopText(TextStream(state.tokenizer, state.stops), req.stop)
    n = 0
    while True:
        kind, value = await job.events.get()
        if kind == "token":
            if isinstance(value, tuple):  # (token, TokenLogprobs): the request asked for logprobs
                value, lp = value
                if value not in state.stops:  # the end token is not part of the answer's content
                    job.logprobs.append(lp)
            if value not in state.stops:
                job.content_ids.append(value)
            n += 1
            delta, stopped = text.push(value)
            if stopped:
                job.stop_string = True
                job.cancel.set()  # the engine drops the row at its next step
                yield delta, "stop", n
                return
            if delta:
                yield delta, None, n
        elif kind == "done":
            yield text.flush(), ("length" if value == "length" else "stop"), n
            return
        else:
            raise ApiError(500, str(value), code="internal_error")


def usage(prompt: PreparedPrompt, completion_tokens: int, job: Job | None = None) -> dict:
    """`cached_tokens` / `cached_image_tensors`: the prompt tokens and image tensors whose K/V the engine
    reused from its prefix cache (continuous batching; 0 with dynamic batching)."""
    info = (job.info if job is not None else None) or {}
    return usage_body(int(prompt.input_ids.numel()), completion_tokens, prompt.visual_tokens, prompt.image_tensors,
                      prompt.cached_visual_tokens, cached_tokens=int(info.get("cached_tokens", 0)),
                      cached_images=int(info.get("cached_images", 0)))


async def _collect(state: AppState, reply: Reply) -> tuple[str, str, int]:
    """The whole answer: (text, finish_reason, completion tokens)."""
    parts, reason, n = [], "stop", 0
    async for delta, fin, n in answer(state, reply.job, reply.req):
        parts.append(delta)
        reason = fin or reason
    return "".join(parts), reason, n


async def finish(state: AppState, request: Request, reply: Reply) -> tuple[str, str, int] | None:
    """The whole answer (text, finish_reason, completion tokens), polling for a client disconnect (which
    cancels the job) while it is made: None when the client left."""
    task = asyncio.ensure_future(_collect(state, reply))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("%s: client disconnected, cancelling", reply.cid)
                task.cancel()
                return None
    finally:
        reply.job.cancel.set()  # no-op once finished; frees the row if we leave early


async def finish_all(state: AppState, request: Request, reply: Reply) -> list[tuple[str, str, int]] | None:
    """Every choice's whole answer (`finish`; with n > 1 they run side by side and are collected in order).
    None when the client left; then every choice's job is cancelled, not only the one being collected."""
    results = []
    try:
        for job in reply.jobs:
            r = await finish(state, request, dataclasses.replace(reply, job=job, others=[]))
            if r is None:
                return None
            results.append(r)
        return results
    finally:
        for job in reply.jobs:
            job.cancel.set()  # no-op for the finished ones


async def _complete(state: AppState, request: Request, reply: Reply) -> Response:
    """A non-streaming chat answer."""
    results = await finish_all(state, request, reply)
    if results is None:
        return Response(status_code=499)
    want_lp = reply.req.logprobs is not None
    choices = []
    for i, ((text, reason, _), job) in enumerate(zip(results, reply.jobs)):
        lps = logprob_entries(state.tokenizer, job.logprobs) if want_lp else None
        choice = completion_body(reply.cid, state.config.model_name, reply.created, text, reason, {},
                                 logprobs=lps)["choices"][0]
        choices.append(dict(choice, index=i))
    body = completion_body(reply.cid, state.config.model_name, reply.created, "", "stop",
                           usage(reply.prompt, sum(n for _, _, n in results), reply.job))
    body["choices"] = choices
    return JSONResponse(body)


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def interleaved(state: AppState, reply: Reply) -> AsyncIterator[tuple[int, str | ApiError, str | None, list, int]]:
    """n > 1 streamed: (choice, text delta, finish_reason or None, the logprobs of the tokens since the choice's
    last event, its completion tokens so far) as the choices produce them; a choice's last event has its finish
    reason (and maybe an empty delta). An ApiError in place of the delta ends the stream. Every job is cancelled
    when the consumer stops, early or not."""
    events: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, job: Job) -> None:
        sent, n, reason = 0, 0, "stop"
        try:
            async for delta, fin, n in answer(state, job, reply.req):
                reason = fin or reason
                if delta:
                    lps = job.logprobs[sent:]
                    sent += len(lps)
                    await events.put((i, delta, None, lps, n))
            await events.put((i, "", reason, job.logprobs[sent:], n))
        except ApiError as e:
            await events.put((i, e, None, [], n))

    tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(reply.jobs)]
    try:
        left = len(tasks)
        while left:
            event = await events.get()
            yield event
            if isinstance(event[1], ApiError):
                return
            left -= event[2] is not None
    finally:
        for t in tasks:
            t.cancel()
        for job in reply.jobs:
            job.cancel.set()


async def sse_choices(state: AppState, reply: Reply, piece: Callable[[int, str, str | None, list], str],
                      usage_event: Callable[[int], str], first: Sequence[str] = ()) -> AsyncIterator[str]:
    """n > 1 streamed, for any endpoint: the `first` events, then `piece(choice, delta, finish_reason, logprobs)`,
    the event of each piece of `interleaved` as it comes; an error after the headers goes in-band;
    `usage_event(completion tokens of all choices)` if the request asked for usage; then [DONE]. Every choice is
    cancelled when the client leaves (the response closes this generator, which closes `interleaved`)."""
    for event in first:
        yield event
    total = 0
    events = interleaved(state, reply)
    try:
        async for i, delta, fin, lps, n in events:
            if isinstance(delta, ApiError):  # headers are sent: report in-band, then end the stream
                yield _event(delta.body())
                yield "data: [DONE]\n\n"
                return
            yield piece(i, delta, fin, lps)
            total += n if fin is not None else 0
    finally:
        await events.aclose()  # the client left: cancel every choice now
    if reply.req.include_usage:
        yield usage_event(total)
    yield "data: [DONE]\n\n"


def _sse_many(state: AppState, reply: Reply) -> AsyncIterator[str]:
    """n > 1 streamed: every choice's chunks (with its index) as they come, interleaved; one usage for all."""
    cid, name, created = reply.cid, state.config.model_name, reply.created
    want_lp = reply.req.logprobs is not None

    def chunk(i: int, delta: dict, fin: str | None, lps: list) -> str:
        body = chunk_body(cid, name, created, delta, finish_reason=fin,
                          logprobs=logprob_entries(state.tokenizer, lps) if want_lp and (lps or delta) else None)
        body["choices"][0]["index"] = i
        return _event(body)

    def piece(i: int, delta: str, fin: str | None, lps: list) -> str:
        return chunk(i, {"content": delta} if delta else {}, fin, lps)

    def usage_event(total: int) -> str:
        return _event(chunk_body(cid, name, created, None, usage=usage(reply.prompt, total, reply.job)))

    roles = [chunk(i, {"role": "assistant", "content": ""}, None, []) for i in range(len(reply.jobs))]
    return sse_choices(state, reply, piece, usage_event, first=roles)


async def _sse(state: AppState, reply: Reply) -> AsyncIterator[str]:
    """The answer as server-sent events: role chunk, content deltas, finish chunk, [usage], [DONE]."""
    cid, name, created = reply.cid, state.config.model_name, reply.created
    try:
        yield _event(chunk_body(cid, name, created, {"role": "assistant", "content": ""}))
        n, reason, sent = 0, "stop", 0
        want_lp = reply.req.logprobs is not None
        try:
            async for delta, fin, n in answer(state, reply.job, reply.req):
                if delta:  # the tokens' logprobs go with the text they completed
                    lps = reply.job.logprobs[sent:]
                    sent += len(lps)
                    yield _event(chunk_body(cid, name, created, {"content": delta},
                                            logprobs=logprob_entries(state.tokenizer, lps) if want_lp else None))
                reason = fin or reason
        except ApiError as e:  # headers are sent: report in-band, then end the stream
            yield _event(e.body())
            yield "data: [DONE]\n\n"
            return
        rest = reply.job.logprobs[sent:]  # tokens whose text never completed (a held-back stop-string prefix)
        yield _event(chunk_body(cid, name, created, {}, finish_reason=reason,
                                logprobs=logprob_entries(state.tokenizer, rest) if want_lp and rest else None))
        if reply.req.include_usage:
            yield _event(chunk_body(cid, name, created, None, usage=usage(reply.prompt, n, reply.job)))
        yield "data: [DONE]\n\n"
    finally:
        # Runs when the answer is complete and when the client disconnects (the generator is cancelled
        # or closed): either way the engine row must not go on.
        reply.job.cancel.set()


async def admitted(request: Request, job: Job) -> Response | None:
    """Continuous batching: wait until the job is in the engine before answering, so that a request too large
    for the whole K/V budget gets a 400 (also when streamed); None when admitted, a 499 if the client left."""
    if job.admitted is None:
        return None
    try:
        while True:
            done, _ = await asyncio.wait({job.admitted}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                job.cancel.set()
                return Response(status_code=499)
    except BaseException:
        job.cancel.set()
        raise
    refused = job.admitted.result()
    if refused is not None:
        raise ApiError(400, f"this request does not fit the server's K/V cache: {refused}; send fewer images or "
                            "tokens, or lower max_tokens", param="messages", code="kv_cache_exceeded")
    return None


async def submit(state: AppState, request: Request, req: Any, prompt: PreparedPrompt, cid: str) -> Reply | Response:
    """Queue a prepared request for the scheduler (every generating route ends here); with continuous
    batching, wait until it is admitted (a 400 if it cannot fit the K/V budget, a 499 Response if the client
    left meanwhile). n > 1 (chat, completions): one job per choice, choice i seeded seed + i (wrapping), each
    with its own grammar state (completions' best_of: one job per candidate)."""
    params = sampling(state, req, token_budget(state, req, prompt))
    jobs = []
    for i in range(getattr(req, "best_of", None) or getattr(req, "n", 1)):  # completions: best_of candidates
        p = params if i == 0 or params.seed is None else dataclasses.replace(
            params, seed=(params.seed + i - SEED_RANGE[0]) % (SEED_RANGE[1] - SEED_RANGE[0] + 1) + SEED_RANGE[0])
        jobs.append(Job(prompt, p, asyncio.get_running_loop(), constraint=constraint(state, req)))
    try:
        for job in jobs:
            state.scheduler.submit(job)
    except QueueFull:
        for job in jobs:  # the ones already queued are dropped by the scheduler
            job.cancel.set()
        raise too_busy(state) from None
    for job in jobs:
        early = await admitted(request, job)
        if early is not None:
            for j in jobs:
                j.cancel.set()
            return early
    return Reply(jobs[0], req, prompt, cid, now(), others=jobs[1:])


# --- routes ---

async def chat_completions(request: Request) -> Response:
    state = state_of(request)
    check_auth(state, request)
    req = parse_chat_request(parse_json(await read_body(state, request)), state.config.model_name,
                             state.config.max_tokens_limit)
    if state.scheduler.full():  # cheap early answer before any media work
        raise too_busy(state)
    prompt = await prepare(state, req)
    reply = await submit(state, request, req, prompt, new_id())
    if isinstance(reply, Response):
        return reply
    if req.stream:
        return StreamingResponse((_sse_many if reply.others else _sse)(state, reply), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(state, request, reply)


async def models(request: Request) -> dict:
    state = state_of(request)
    check_auth(state, request)
    return {"object": "list", "data": [{"id": state.config.model_name, "object": "model", "created": state.started,
                                        "owned_by": "hyperowl"}]}


async def health(request: Request) -> dict:
    state = state_of(request)
    return {"status": "ok", "model": state.config.model_name, "scheduler": state.scheduler.stats(),
            "feature_cache": state.pipeline.encoder.cache.stats(), "time": time.time()}


async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


async def favicon() -> FileResponse:  # browsers ask for it on their own: answer, so the page logs no 404
    return FileResponse(WEB_DIR / "favicon.svg", media_type="image/svg+xml")


async def web_file(name: str) -> FileResponse:
    path = (WEB_DIR / name).resolve()
    if not path.is_relative_to(WEB_DIR.resolve()) or not path.is_file():
        raise ApiError(404, f"no such file {name!r}", code="not_found")
    return FileResponse(path)


def create_app(model: Any, processor: Any, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The app for one loaded model (with its processor). The scheduler thread starts with the app."""
    state = build_state(model, processor, config)
    app = FastAPI(title="hyperowl", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    app.state.scheduler, app.state.feature_cache, app.state.config = (state.scheduler, state.pipeline.encoder.cache,
                                                                      config)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, internal_error)
    # The routes read raw bodies (protocol.py's parser, its error messages); schema.py publishes the models.
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], responses=CHAT_RESPONSES,
                      summary="Create a chat completion")
    app.add_api_route("/v1/models", models, methods=["GET"], response_model=ModelList, responses=errors(401),
                      summary="List the served model")
    app.openapi = lambda: openapi(app, config.max_tokens_limit)  # type: ignore[method-assign]
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/web/{name}", web_file, methods=["GET"], include_in_schema=False)
    app.add_api_route("/favicon.ico", favicon, methods=["GET"], include_in_schema=False)
    add_live_routes(app)  # live video sessions: serve/live.py
    from .completions import add_completion_routes  # these build on this module's request steps
    from .responses import add_response_routes

    add_completion_routes(app)  # legacy POST /v1/completions: serve/completions.py
    add_response_routes(app)  # the Responses API: serve/responses.py
    return app


def serve(model: Any, processor: Any, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the server until interrupted (blocking)."""
    import uvicorn

    uvicorn.run(create_app(model, processor, config), host=host, port=port, log_level=log_level)


class ServerThread:
    """uvicorn in a background thread on 127.0.0.1 and a free port (tests, benchmarks, notebooks).

        with ServerThread(create_app(model, processor)) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 30.0) -> None:
        import socket

        import uvicorn

        if port == 0:  # ask the OS for a free port, then hand it to uvicorn
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port, self.startup_timeout_s = host, port, startup_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self._thread: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerThread":
        import threading

        self._thread = threading.Thread(target=self.server.run, name="hyperowl-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:  # bounded wait for the socket to listen
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
