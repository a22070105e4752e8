"""The Responses API: `POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`.

Design note: a Responses request is a chat request in another shape, so it is parsed into protocol.py's
messages (`input_text` / `output_text` parts -> text, `input_image` -> an image part with the same media path
and URL policy as chat) and answered by the chat machinery of app.py (prepare, submit, answer). What is its
own: the `response` object, the typed stream events the `openai` client's `responses.create(stream=True)` and
`responses.stream()` accumulate (response.created, response.in_progress, output_item.added,
content_part.added, output_text.delta ..., output_text.done, content_part.done, output_item.done, then
response.completed, or response.incomplete when `max_output_tokens` ended the answer, as OpenAI does), and
multi-turn through `previous_response_id`. Logprobs (`include: ["message.output_text.logprobs"]` and/or
`top_logprobs`): the output_text part's `logprobs` and each delta event's (the tokens that delta completed),
entries shaped as chat's (token, logprob, bytes, top_logprobs), from the same engine values.

Multi-turn: a stored response keeps its conversation (the earlier turns, its own input and its answer, not its
`instructions`: OpenAI does not carry instructions over either), and a request naming it is answered as that
conversation plus its input, after its own `instructions`. The store is in memory, per process: an LRU bounded
by a count (`ServeConfig.max_stored_responses`) and by the bytes of text and URLs it holds
(`max_stored_response_mb`; data: URLs count fully). A response made with `store: false` is not kept. An id the
store does not hold (never made, not stored, evicted, or from before a restart) is a 404 naming it.

Exact ids across turns: each stored answer keeps the token ids the model produced for it (its content, without
the stop token), and the next turn's prompt is planned with those ids in place of the answer's text
(processing/plan.py, exact answer ids): a text that does not tokenize back to the same ids would otherwise end
the prefix match at the first answer. So the prompt is the previous turn's prompt + its answer ids + the
template's end of turn + the new input, and the continuous engine's prefix cache (which registers generated
tokens' blocks too) serves the whole history: only the new turn is prefilled. An answer cut by a stop string
keeps its text only (its ids go past the text). Chat completions stay stateless: the client sends the text and
it is tokenized again (as vLLM does).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .app import (AppState, Reply, answer, check_auth, finish, prepare, read_body, state_of, submit, too_busy,
                  usage)
from .protocol import (ApiError, Message, ResponseRequest, TextPart, logprob_entries, parse_json,
                       parse_response_request)
from .schema import RESPONSE_RESPONSES, Response as ResponseModel, errors

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Stored:
    history: list[Message]  # the conversation up to and including this response's answer
    body: dict  # the response object, as GET /v1/responses/{id} returns it
    nbytes: int


def _nbytes(history: list[Message], body: dict) -> int:
    parts = [p for m in history for p in m.parts]
    ids = sum(len(m.ids) for m in history if m.ids is not None)  # an answer's exact ids, 8 bytes each
    text = sum(len(p.text) if isinstance(p, TextPart) else len(p.url) for p in parts)
    return text + len(json.dumps(body)) + 8 * ids


class ResponseStore:
    """Stored responses by id: an LRU bounded by count and bytes. Used from the event loop only (no lock)."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self.items: OrderedDict[str, Stored] = OrderedDict()
        self.nbytes = 0

    def put(self, rid: str, history: list[Message], body: dict) -> None:
        entry = Stored(history, body, _nbytes(history, body))
        if entry.nbytes > self.max_bytes or self.max_items < 1:
            log.warning("response %s (%d bytes) is larger than the response store: not kept", rid, entry.nbytes)
            return
        self.items[rid] = entry
        self.nbytes += entry.nbytes
        while len(self.items) > self.max_items or self.nbytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.nbytes -= old.nbytes

    def get(self, rid: str, param: str | None = None) -> Stored:
        entry = self.items.get(rid)
        if entry is None:
            raise ApiError(404, f"response {rid!r} not found: it was never made, made with store=false, evicted (this "
                                f"server keeps the last {self.max_items}), or made before a restart; send the "
                                "conversation as input instead", param=param, code="response_not_found")
        self.items.move_to_end(rid)
        return entry

    def delete(self, rid: str) -> None:
        entry = self.get(rid)
        del self.items[rid]
        self.nbytes -= entry.nbytes


def response_usage(reply: Reply, n: int) -> dict:
    u = usage(reply.prompt, n, reply.job)
    details = u["prompt_tokens_details"]
    return {"input_tokens": u["prompt_tokens"], "output_tokens": n, "total_tokens": u["total_tokens"],
            "input_tokens_details": {**details, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}


class Answer:
    """One response being made: its ids and the objects it is reported with."""

    def __init__(self, state: AppState, req: ResponseRequest, reply: Reply) -> None:
        self.state, self.req, self.reply = state, req, reply
        self.msg_id = "msg_" + uuid.uuid4().hex[:24]

    @property
    def wants_logprobs(self) -> bool:
        return self.req.sampling.get("logprobs") is not None

    def logprobs(self, lps: list | None = None) -> list[dict]:
        """Entries of the given TokenLogprobs (default: all of the answer's so far); [] when not asked."""
        if not self.wants_logprobs:
            return []
        return logprob_entries(self.state.tokenizer, self.reply.job.logprobs if lps is None else lps)

    def message(self, text: str, status: str) -> dict:
        return {"id": self.msg_id, "type": "message", "role": "assistant", "status": status,
                "content": [] if status == "in_progress" else [self.part(text, self.logprobs())]}

    @staticmethod
    def part(text: str, logprobs: list[dict] | None = None) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    def body(self, status: str, text: str = "", n: int | None = None) -> dict:
        """The response object: in_progress (no output yet), completed or incomplete (with usage)."""
        req, s = self.req, self.req.sampling
        done = status in ("completed", "incomplete")
        return {"id": self.reply.cid, "object": "response", "created_at": self.reply.created,
                "completed_at": int(time.time()) if done else None, "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": req.instructions, "max_output_tokens": s["max_tokens"],
                "model": self.state.config.model_name,
                "output": [self.message(text, status)] if done else [],
                "parallel_tool_calls": False, "previous_response_id": req.previous_response_id,
                "store": req.store, "temperature": s["temperature"], "top_p": s["top_p"],
                "text": {"format": {"type": "text"}}, "tool_choice": "none", "tools": [], "truncation": "disabled",
                "usage": response_usage(self.reply, n) if done and n is not None else None,
                "metadata": req.metadata or {}, "top_logprobs": s.get("logprobs")}

    def keep(self, store: ResponseStore, history: list[Message], text: str, body: dict) -> None:
        if self.req.store:
            job = self.reply.job
            ids = None if job.stop_string else list(job.content_ids)  # a stop string cut the text short of them
            answer_msg = Message("assistant", [TextPart(text)], f"response {self.reply.cid}", ids=ids)
            store.put(self.reply.cid, history + self.req.input + [answer_msg], body)


def store_of(request: Request) -> ResponseStore:
    return request.app.state.responses


def _status(reason: str) -> str:
    return "incomplete" if reason == "length" else "completed"


def _event(kind: str, seq: int, **fields: Any) -> str:
    body = {"type": kind, "sequence_number": seq, **fields}
    return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(ans: Answer, store: ResponseStore, history: list[Message]) -> AsyncIterator[str]:
    reply, seq = ans.reply, 0

    def ev(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        return _event(kind, seq - 1, **fields)

    where = dict(item_id=ans.msg_id, output_index=0, content_index=0)
    try:
        yield ev("response.created", response=ans.body("in_progress"))
        yield ev("response.in_progress", response=ans.body("in_progress"))
        yield ev("response.output_item.added", output_index=0, item=ans.message("", "in_progress"))
        yield ev("response.content_part.added", part=ans.part(""), **where)
        parts, reason, n, sent = [], "stop", 0, 0
        try:
            async for delta, fin, n in answer(ans.state, reply.job, reply.req):
                if delta:  # the tokens' logprobs go with the text they completed
                    parts.append(delta)
                    lps = reply.job.logprobs[sent:]
                    sent += len(lps)
                    yield ev("response.output_text.delta", delta=delta, logprobs=ans.logprobs(lps), **where)
                reason = fin or reason
        except ApiError as e:  # headers are sent: report in-band, then end the stream
            yield ev("error", message=e.message, code=e.code, param=e.param)
            return
        text, status = "".join(parts), _status(reason)
        yield ev("response.output_text.done", text=text, logprobs=ans.logprobs(), **where)
        yield ev("response.content_part.done", part=ans.part(text, ans.logprobs()), **where)
        yield ev("response.output_item.done", output_index=0, item=ans.message(text, status))
        body = ans.body(status, text, n)
        ans.keep(store, history, text, body)
        yield ev(f"response.{status}", response=body)
    finally:
        reply.job.cancel.set()  # finished or disconnected: the engine row must not go on


async def create_response(request: Request) -> Response:
    state = state_of(request)
    check_auth(state, request)
    req = parse_response_request(parse_json(await read_body(state, request)), state.config.model_name,
                                 state.config.max_tokens_limit)
    store = store_of(request)
    history = store.get(req.previous_response_id, "previous_response_id").history if req.previous_response_id \
        else []
    chat = req.chat(history)
    if state.scheduler.full():
        raise too_busy(state)
    prompt = await prepare(state, chat)
    reply = await submit(state, request, chat, prompt, "resp_" + uuid.uuid4().hex[:24])
    if isinstance(reply, Response):
        return reply
    ans = Answer(state, req, reply)
    if req.stream:
        return StreamingResponse(_sse(ans, store, history), media_type="text/event-stream", headers=SSE_HEADERS)
    result = await finish(state, request, ans.reply)
    if result is None:
        return Response(status_code=499)
    text, reason, n = result
    body = ans.body(_status(reason), text, n)
    ans.keep(store, history, text, body)
    return JSONResponse(body)


async def get_response(request: Request, response_id: str) -> dict:
    state = state_of(request)
    check_auth(state, request)
    return store_of(request).get(response_id).body


async def delete_response(request: Request, response_id: str) -> dict:
    state = state_of(request)
    check_auth(state, request)
    store_of(request).delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def add_response_routes(app: FastAPI) -> None:
    config = app.state.serve.config
    app.state.responses = ResponseStore(config.max_stored_responses, int(config.max_stored_response_mb * 2**20))
    app.add_api_route("/v1/responses", create_response, methods=["POST"], responses=RESPONSE_RESPONSES,
                      summary="Create a response (the Responses API)")
    app.add_api_route("/v1/responses/{response_id}", get_response, methods=["GET"], response_model=ResponseModel,
                      responses=errors(401, 404), summary="A stored response")
    app.add_api_route("/v1/responses/{response_id}", delete_response, methods=["DELETE"],
                      responses=errors(401, 404), summary="Delete a stored response")

