"""Legacy completions, `POST /v1/completions`: a raw text prompt in (no chat template), text out.

Design note: many evaluation tools still call this endpoint with a prompt they formatted themselves, so the
prompt is tokenized as it is, with only the special tokens the tokenizer itself adds (Owl2's BOS; none for
Owl3's Qwen tokenizer), and no media: a prompt holding the image/video placeholder text is refused, since it
would make the model read an image that was never sent. Everything after tokenizing is the chat route's:
the context check, the scheduler, stop strings, cancellation on disconnect (app.py). The body follows
OpenAI's `text_completion` objects, streamed as `data:` events ending with `data: [DONE]` like chat.

Fields (which are honoured, ignored or refused: protocol.COMPLETION_FIELDS): `prompt` (a string or a list of
one string; token-id prompts are refused), `max_tokens` (default 16, OpenAI's), `temperature`, `top_p`,
`stop`, `seed`, `stream`, `stream_options.include_usage`, the extensions `top_k`, `repetition_penalty`,
`min_tokens`; `echo` only false, `suffix` only absent; `logprobs` (int) gives the legacy logprobs object.
`n` (1-8): n choices, made as chat's are (one job each, choice i seeded seed + i; the continuous engine shares
the prompt's prefill through its prefix cache), streamed interleaved with their `index`. `best_of` (n-8, not
streamed): that many candidates, the n with the highest mean token logprob returned (usage counts them all).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..processing.chat import IMAGE_TOKEN, VIDEO_TOKEN
from .app import (AppState, Reply, answer, check_auth, check_prompt_length, finish_all, read_body, sse_choices,
                  state_of, submit, too_busy, usage)
from .prompt import PreparedPrompt
from .protocol import ApiError, CompletionRequest, parse_completion_request, parse_json, token_bytes
from .schema import COMPLETION_RESPONSES

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def raw_prompt(state: AppState, req: CompletionRequest) -> PreparedPrompt:
    """The prompt's token ids as the tokenizer makes them (its own special tokens only), no media."""
    for token in (IMAGE_TOKEN, VIDEO_TOKEN):
        if token in req.prompt:
            raise ApiError(400, f"'prompt' must not contain {token}: /v1/completions takes text only; send images "
                                "to /v1/chat/completions or /v1/responses", param="prompt", code="invalid_value")
    ids = state.tokenizer.encode(req.prompt, add_special_tokens=True).ids
    if not ids:
        raise ApiError(400, "'prompt' tokenizes to nothing; send some text", param="prompt", code="invalid_value")
    pipe = state.pipeline
    prompt = PreparedPrompt(torch.tensor(ids, dtype=torch.long), None, [],
                            pipe.family.feature_tokens(pipe.model.config))
    check_prompt_length(state.config, prompt, "prompt")
    return prompt


def legacy_logprobs(tokenizer: Any, lps: list, offset: int = 0) -> dict:
    """The completions endpoint's logprobs object: tokens, token_logprobs, top_logprobs ({token: logprob}) and
    text_offset (each token's start in the answer text, counted from `offset`)."""
    tokens, offsets = [], []
    for x in lps:
        offsets.append(offset)
        tokens.append(token_bytes(tokenizer, x.token).decode("utf-8", errors="replace"))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps], "text_offset": offsets,
            "top_logprobs": [{token_bytes(tokenizer, t).decode("utf-8", errors="replace"): v for t, v in x.top}
                             for x in lps]}


def completion_body(reply: Reply, model: str, text: str, finish_reason: str | None, n: int | None,
                    logprobs: dict | None = None, index: int = 0) -> dict:
    """A `text_completion` object: the whole answer, or one streamed piece (`n` None: no usage)."""
    body = {"id": reply.cid, "object": "text_completion", "created": reply.created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if n is not None:
        body["usage"] = usage(reply.prompt, n, reply.job)
    return body


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(state: AppState, reply: Reply) -> AsyncIterator[str]:
    """Text pieces, one finishing event, [usage with no choices], [DONE] (as OpenAI streams completions)."""
    name = state.config.model_name
    try:
        n, reason, sent, offset = 0, "stop", 0, 0
        want_lp = reply.req.logprobs is not None
        try:
            async for delta, fin, n in answer(state, reply.job, reply.req):
                if delta:
                    lps = reply.job.logprobs[sent:]
                    sent += len(lps)
                    lp = legacy_logprobs(state.tokenizer, lps, offset) if want_lp else None
                    offset += len(delta)
                    yield _event(completion_body(reply, name, delta, None, None, lp))
                reason = fin or reason
        except ApiError as e:  # headers are sent: report in-band, then end the stream
            yield _event(e.body())
            yield "data: [DONE]\n\n"
            return
        yield _event(completion_body(reply, name, "", reason, None))
        if reply.req.include_usage:
            yield _event({**completion_body(reply, name, "", None, n), "choices": []})
        yield "data: [DONE]\n\n"
    finally:
        reply.job.cancel.set()  # finished or disconnected: the engine row must not go on


def _sse_many(state: AppState, reply: Reply) -> AsyncIterator[str]:
    """n > 1 streamed: each choice's pieces (with its index) as they come, interleaved (app.sse_choices); one
    finishing event per choice, [usage for all], [DONE]."""
    name, want_lp = state.config.model_name, reply.req.logprobs is not None
    offsets = [0] * len(reply.jobs)  # each choice's text offset (the legacy logprobs' text_offset)

    def piece(i: int, delta: str, fin: str | None, lps: list) -> str:
        lp = legacy_logprobs(state.tokenizer, lps, offsets[i]) if want_lp and fin is None else None
        offsets[i] += len(delta)
        return _event(completion_body(reply, name, delta, fin, None, lp, index=i))

    def usage_event(total: int) -> str:
        return _event({**completion_body(reply, name, "", None, total), "choices": []})

    return sse_choices(state, reply, piece, usage_event)


async def _complete(state: AppState, request: Request, req: CompletionRequest, reply: Reply) -> Response:
    """The whole answer: n choices (of best_of candidates, the n best by mean token logprob)."""
    texts = await finish_all(state, request, reply)
    if texts is None:
        return Response(status_code=499)
    results = list(zip(texts, reply.jobs))
    total = sum(n for (_, _, n), _ in results)
    if req.best_of:  # stable: among equal scores (greedy candidates) the lower index wins
        mean = lambda job: sum(x.logprob for x in job.logprobs) / max(1, len(job.logprobs))  # noqa: E731
        results = sorted(results, key=lambda rj: -mean(rj[1]))[: req.n]
    name = state.config.model_name
    choices = []
    for i, ((text, reason, _), job) in enumerate(results):
        lp = legacy_logprobs(state.tokenizer, job.logprobs) if req.logprobs is not None else None
        choices.append(completion_body(reply, name, text, reason, None, lp, index=i)["choices"][0])
    body = completion_body(reply, name, "", "stop", total)
    body["choices"] = choices
    return JSONResponse(body)


async def completions(request: Request) -> Response:
    state = state_of(request)
    check_auth(state, request)
    req = parse_completion_request(parse_json(await read_body(state, request)), state.config.model_name,
                                   state.config.max_tokens_limit)
    if state.scheduler.full():
        raise too_busy(state)
    prompt = await asyncio.to_thread(raw_prompt, state, req)
    # best_of ranks its candidates by their tokens' logprobs: the engine records them even if not asked for
    engine_req = dataclasses.replace(req, logprobs=0) if req.best_of and req.logprobs is None else req
    reply = await submit(state, request, engine_req, prompt, "cmpl-" + uuid.uuid4().hex[:24])
    if isinstance(reply, Response):
        return reply
    if req.stream:
        return StreamingResponse((_sse_many if reply.others else _sse)(state, reply), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    return await _complete(state, request, req, reply)


def add_completion_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/completions", completions, methods=["POST"], responses=COMPLETION_RESPONSES,
                      summary="Create a completion (legacy: a raw prompt, no chat template)")
