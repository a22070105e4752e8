"""Live video sessions over HTTP: create a session, POST frames as they are captured, ask at any time.

Design note
-----------
REST, not a WebSocket, and its own routes rather than `/v1/chat/completions` with a session id:
- every call is a plain HTTP request, so curl, the `openai`-style clients' HTTP layer, proxies, the
  server's bearer auth, body limit and JSON error format all apply unchanged; at a few frames per second
  one POST per frame (or per batch) costs nothing next to the tower;
- a question about a live session is not a chat completion: the conversation lives in the server (the
  session's kept cache), the client sends a question, not a message history. Overloading the OpenAI
  schema would give `messages` two meanings; a separate route keeps both honest. Answers stream the same
  way (server-sent events, `stream: true`).
Each session is a `hyperowl.live.LiveSession` over the server's pipeline (its model and encoder); frames
are encoded and appended by the session's own thread, questions run in a worker thread so the event loop
never waits for the model. Sessions are few (`MAX_SESSIONS`) and end with DELETE, when the server stops, or
after `live_session_idle_s` (--live-session-idle-s, default 600) without a request: a reaper thread frees
them (a session answering or streaming an answer is not idle), and a later request for one gets a 404
saying it expired.

    POST   /v1/live                   {"memory_gb"?, "system"?, "max_tokens"?}      -> {"id", ...status}
    POST   /v1/live/{id}/frames       an image body (image/jpeg, image/png, ...), or
                                      {"frames": [data URLs], "timestamps"?: [s, ...]} -> status
    POST   /v1/live/{id}/ask          {"question", "stream"?, "max_tokens"?, "temperature"?, ...}
                                      -> {"answer", "stream_time", ...status} or SSE {"delta"} events
    GET    /v1/live/{id}              -> status + the prompt text so far
    DELETE /v1/live/{id}
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from ..errors import InputError
from .media import MediaBlob, MediaLimits, decode_image, resolve
from .protocol import ApiError, MediaPart, new_id, parse_json

log = logging.getLogger(__name__)

MAX_SESSIONS = 8
SAMPLING = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "seed": "seed", "repetition_penalty": "repetition_penalty"}


class Sessions:
    """The open sessions, when each was last used, and which expired (for a clear 404)."""

    def __init__(self, idle_s: Optional[float] = 600.0) -> None:
        self.by_id: dict[str, Any] = {}
        self.used: dict[str, float] = {}  # monotonic time of each session's last request (start or end)
        self.busy: dict[str, int] = {}  # requests in flight per session: never idle while answering
        self.expired: OrderedDict[str, None] = OrderedDict()  # the latest expired ids (bounded)
        self.idle_s = idle_s if idle_s and idle_s > 0 else None
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: Optional[threading.Thread] = None

    def add(self, sid: str, live: Any) -> None:  # under self.lock
        self.by_id[sid], self.used[sid], self.busy[sid] = live, time.monotonic(), 0
        if self.idle_s is not None and self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name="hyperowl-live-reaper", daemon=True)
            self._reaper.start()

    def get(self, sid: str) -> Any:
        live = self.by_id.get(sid)
        if live is None:
            if sid in self.expired:
                raise ApiError(404, f"live session {sid!r} expired after {self.idle_s:g} s without a request "
                               "(--live-session-idle-s) and was freed; create a new one with POST /v1/live",
                               code="session_expired")
            raise ApiError(404, f"no live session {sid!r}; create one with POST /v1/live", code="not_found")
        return live

    def acquire(self, sid: str) -> Any:
        """The session for one request: not idle until `release`."""
        self._expire()  # one idle past its time is gone even if the reaper has not come by yet
        with self.lock:
            live = self.get(sid)
            self.busy[sid] += 1
            self.used[sid] = time.monotonic()
            return live

    def release(self, sid: str) -> None:
        with self.lock:
            if sid in self.busy:
                self.busy[sid] -= 1
                self.used[sid] = time.monotonic()

    def pop(self, sid: str) -> Any:  # under self.lock
        live = self.get(sid)
        for d in (self.by_id, self.used, self.busy):
            del d[sid]
        return live

    def _expire(self) -> None:
        if self.idle_s is None:
            return
        now, gone = time.monotonic(), []
        with self.lock:
            for sid in [s for s in self.by_id if not self.busy[s] and now - self.used[s] > self.idle_s]:
                gone.append((sid, self.pop(sid)))
                self.expired[sid] = None
                while len(self.expired) > 1024:
                    self.expired.popitem(last=False)
        for sid, live in gone:
            log.info("live session %s expired after %g s idle; freed", sid, self.idle_s)
            live.close()

    def _reap(self) -> None:
        while not self._stop.wait(min(30.0, max(0.05, self.idle_s / 4))):
            self._expire()

    def close_all(self) -> None:
        self._stop.set()
        with self.lock:
            sessions = list(self.by_id.values())
            self.by_id, self.used, self.busy = {}, {}, {}
        for s in sessions:
            s.close()


def _state(request: Request):
    from .app import check_auth, state_of

    state = state_of(request)
    check_auth(state, request)
    return state, request.app.state.live


def _status(sid: str, live) -> dict:
    return {"id": sid, "object": "live.session", **live.status()}


def _sampling(body: dict) -> dict:
    out = {}
    for key, name in SAMPLING.items():
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ApiError(400, f"'{key}' must be a number", param=key, code="invalid_type")
            out[name] = value
    return out


async def create(request: Request) -> dict:
    from .app import read_body

    state, sessions = _state(request)
    raw = await read_body(state, request)
    body = parse_json(raw) if raw.strip() else {}
    memory_gb = body.get("memory_gb")
    if memory_gb is not None and (isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float))):
        raise ApiError(400, "'memory_gb' must be a number", param="memory_gb", code="invalid_type")
    system = body.get("system") or ""
    if not isinstance(system, str):
        raise ApiError(400, "'system' must be a string", param="system", code="invalid_type")
    with sessions.lock:
        if len(sessions.by_id) >= MAX_SESSIONS:
            raise ApiError(429, f"{MAX_SESSIONS} live sessions are open; DELETE one first", code="too_many_sessions")
        try:
            live = state.pipeline.live(system=system, memory_gb=memory_gb, **_sampling(body))
        except InputError as e:
            raise ApiError(422, str(e), code="invalid_value") from None
        sid = "live-" + new_id().split("-")[-1]
        sessions.add(sid, live)
    return _status(sid, live)


async def frames(sid: str, request: Request) -> dict:
    state, sessions = _state(request)
    live = sessions.acquire(sid)
    try:
        return await _frames(sid, live, state, request)
    finally:
        sessions.release(sid)


async def _frames(sid: str, live, state, request: Request) -> dict:
    from .app import read_body

    raw = await read_body(state, request)
    limits: MediaLimits = state.limits
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    timestamps = None
    if kind.startswith("image/"):  # one frame as the body
        images = [decode_image(MediaBlob("image", raw, "", "body"))]
        if "x-stream-time" in request.headers:
            try:
                timestamps = [float(request.headers["x-stream-time"])]
            except ValueError:
                raise ApiError(400, "X-Stream-Time must be seconds (a number)", code="invalid_value") from None
    else:
        body = parse_json(raw)
        urls = body.get("frames")
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise ApiError(400, "'frames' must be a non-empty list of data URLs (data:image/jpeg;base64,...), or "
                           "send one image as the body", param="frames", code="invalid_type")
        images = []
        for j, url in enumerate(urls):
            part = MediaPart("image", url, f"frames[{j}]")
            if not url.startswith("data:"):
                raise ApiError(400, f"frames[{j}]: live frames must be data URLs", param=f"frames[{j}]",
                               code="invalid_url")
            images.append(decode_image(await resolve(part, limits)))
        timestamps = body.get("timestamps")
        if timestamps is not None and (not isinstance(timestamps, list) or
                                       not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in timestamps)):
            raise ApiError(400, "'timestamps' must be a list of seconds", param="timestamps", code="invalid_type")
    try:  # in a thread: a sender far ahead of the tower waits there (backpressure), not on the event loop
        await asyncio.to_thread(live.add_frames, images, timestamps)
    except InputError as e:
        raise ApiError(422, str(e), code="invalid_value") from None
    return _status(sid, live)


async def ask(sid: str, request: Request):
    state, sessions = _state(request)
    live = sessions.acquire(sid)
    streaming = False
    try:
        out = await _ask(sid, live, state, request)
        streaming = isinstance(out, StreamingResponse)
        return out
    finally:
        if not streaming:  # a streamed answer releases the session when it ends (_sse)
            sessions.release(sid)


async def _ask(sid: str, live, state, request: Request):
    from .app import read_body

    sessions = request.app.state.live
    body = parse_json(await read_body(state, request))
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ApiError(400, "'question' must be a non-empty string", param="question", code="invalid_type")
    options = _sampling(body)
    try:  # in a thread: ask first waits for the frames already posted
        pieces = await asyncio.to_thread(live.ask, question, True, **options)
    except InputError as e:
        raise ApiError(422, str(e), code="invalid_value") from None
    if body.get("stream"):
        return StreamingResponse(_sse(sid, live, _pump(sid, pieces, sessions)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    answer = await asyncio.to_thread(lambda: "".join(pieces))  # the whole answer in one thread (the session lock)
    return {"answer": answer, **_status(sid, live)}


def _pump(sid: str, pieces, sessions: Sessions) -> asyncio.Queue:
    """Run the whole generation in one thread (it holds the session's lock, which must be released by the
    thread that took it), handing pieces to the event loop; started now, so the session is released when
    the generation ends even if the client never reads the response."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def run() -> None:
        try:
            for piece in pieces:
                loop.call_soon_threadsafe(queue.put_nowait, piece)
        finally:
            sessions.release(sid)
            loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=run, name=f"hyperowl-live-ask:{sid}", daemon=True).start()
    return queue


async def _sse(sid: str, live, queue: asyncio.Queue) -> AsyncIterator[str]:
    """The answer's pieces (from `_pump`) as events, then the status."""
    while (piece := await queue.get()) is not None:
        yield f"data: {json.dumps({'delta': piece})}\n\n"
    yield f"data: {json.dumps(_status(sid, live))}\n\n"
    yield "data: [DONE]\n\n"


async def show(sid: str, request: Request) -> dict:
    _, sessions = _state(request)
    live = sessions.acquire(sid)
    try:
        return {**_status(sid, live), "prompt": live.prompt()}
    finally:
        sessions.release(sid)


async def delete(sid: str, request: Request) -> dict:
    _, sessions = _state(request)
    with sessions.lock:
        live = sessions.pop(sid)
    await asyncio.to_thread(live.close)
    return {"id": sid, "object": "live.session", "deleted": True}


async def page():
    from fastapi.responses import FileResponse

    from .app import WEB_DIR

    return FileResponse(WEB_DIR / "live.html", media_type="text/html")


def add_live_routes(app: FastAPI) -> None:
    """Register the live-session routes (and the /live page) on the server's app."""
    app.state.live = Sessions(getattr(app.state.config, "live_session_idle_s", 600.0))
    app.add_api_route("/v1/live", create, methods=["POST"])
    app.add_api_route("/v1/live/{sid}/frames", frames, methods=["POST"])
    app.add_api_route("/v1/live/{sid}/ask", ask, methods=["POST"])
    app.add_api_route("/v1/live/{sid}", show, methods=["GET"])
    app.add_api_route("/v1/live/{sid}", delete, methods=["DELETE"])
    app.add_api_route("/live", page, methods=["GET"], include_in_schema=False)
