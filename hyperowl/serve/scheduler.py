"""Request queue + dynamic batching: one worker thread owns the model and runs the engine on batches.

Design note: the HTTP handlers never touch the model. They put a `Job` (token ids, media items, sampling
parameters, a cancel flag, an asyncio queue) on a bounded queue; when it is full `submit` raises
`QueueFull` and the server answers 429. The worker waits for the first job, then collects whatever else
arrives within `batch_window_s` (up to `max_batch_size`), has the encoder run the vision tower once on the
batch's uncached media (`Encoder.finish`: the handlers already decoded them), and runs `Engine.stream` on the whole batch: one left-padded prefill, then one decode step per token
for all live rows. Each produced token is handed to its job's asyncio queue with
`loop.call_soon_threadsafe` (asyncio queues are not thread-safe). This is *dynamic* batching: jobs that
arrive while a batch runs wait for the next batch (continuous batching would need rows to join a running
KV cache, which cache.py does not support yet). A batch's visual K/V cache holds every row's images padded to
its largest row's count ([B, N_max*T] per hyper layer), so a request with many images (a long video) batched
with single-image chats would multiply its memory by the batch size: a job joins a batch only while the
batch pads at most `max_padded_images` image slots; the others wait, first in line, for the next batch.
Finished rows leave the batch inside the engine, and so do
cancelled ones: a handler whose client went away sets the job's `threading.Event`, the engine drops that
row at its next decode step (freeing its cache rows), and a job cancelled while still queued is skipped.

Fault isolation: one request's failure must not fail the rows batched with it. Before a batch runs, each job
is checked alone (`Engine.check`) and gets its own seeded generator (`Engine.generator`), and the vision
tower runs on the batch's media at once but, if that fails, once per job. If the batched generation still
fails (a fault no check foresaw, or out of memory), every unfinished row is run again *alone*, continuing
from the tokens it already sent (prompt + those tokens as the new prompt, its own generator, the rest of its
budget), so its client sees one unbroken answer; a row that fails alone is the culprit and gets the error.

Events on a job's queue: ("token", id), then exactly one terminal ("done", finish_reason) or
("error", message). finish_reason: "stop" (a stop token), "length" (max_tokens), "cancelled" (the
client left, or the handler found a stop string and set `stop_string` first: counted as completed).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import dataclasses

import torch
from torch import Tensor

from ..encoder import Encoder
from ..engine import Engine, Request, SamplingParams
from .prompt import PreparedPrompt

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded request queue is full: try again later."""


@dataclass
class Job:
    prompt: PreparedPrompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    finished: bool = False  # a terminal event was pushed (worker thread only)
    tokens: list[int] = field(default_factory=list)  # sent so far (worker thread only): a re-run continues after them
    generator: torch.Generator | None = None  # the row's random stream, made by the worker before the batch runs
    stop_string: bool = False  # the handler ended the answer at a stop string (then set `cancel`)
    constraint: Any = None  # the request's grammar (structured.Constraint), made by the handler
    logprobs: list = field(default_factory=list)  # TokenLogprobs of the answer's tokens (event loop side, app.answer)

    def push(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody listens
            pass

    def finish(self, kind: str, value: Any) -> None:
        if not self.finished:
            self.finished = True
            self.push(kind, value)


def padded_images(counts: list[int]) -> int:
    """Image slots a batch with these per-row image counts pads: every row holds as many as the largest."""
    return len(counts) * max(counts, default=0) - sum(counts)


class Scheduler:
    def __init__(self, model: Any, encoder: Encoder, *, max_batch_size: int = 8, batch_window_s: float = 0.01,
                 max_queue: int = 64, max_padded_images: int = 32) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_padded_images < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_padded_images >= 0")
        self.model, self.encoder = model, encoder
        self.engine = Engine(model)
        self.max_batch_size, self.batch_window_s = max_batch_size, batch_window_s
        self.max_padded_images = max_padded_images
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._deferred: deque[Job] = deque()  # jobs that did not fit a batch: first in line for the next one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.running = 0  # rows in the batch being decoded
        self.batch_sizes: Counter[int] = Counter()
        self.completed = self.cancelled = self.failed = self.tokens = 0

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hyperowl-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while self._deferred:
            self._deferred.popleft().finish("error", "the server is shutting down")
        while True:  # whoever is still waiting gets an answer instead of hanging
            try:
                self._queue.get_nowait().finish("error", "the server is shutting down")
            except queue.Empty:
                break

    # -- producer side (event loop) ------------------------------------------------------------------------
    def full(self) -> bool:
        return self._queue.full()

    def submit(self, job: Job) -> None:
        if self._stop.is_set():
            raise QueueFull("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"queued": self._queue.qsize() + len(self._deferred), "max_queue": self._queue.maxsize,
                    "deferred": len(self._deferred), "max_padded_images": self.max_padded_images, "running": self.running,
                    "max_batch_size": self.max_batch_size, "batches": sum(self.batch_sizes.values()),
                    "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                    "largest_batch": max(self.batch_sizes, default=0), "completed": self.completed,
                    "cancelled": self.cancelled, "failed": self.failed, "tokens": self.tokens}

    # -- worker thread ------------------------------------------------------------------------------------
    def _collect(self) -> list[Job]:
        """The next batch: the oldest waiting job, then (deferred jobs first, then arrivals within the batch
        window) every job that keeps the batch's image padding within `max_padded_images`."""
        waiting, self._deferred = self._deferred, deque()
        if not waiting:
            try:
                waiting.append(self._queue.get(timeout=0.1))  # a bounded wait, so stop() is noticed
            except queue.Empty:
                return []
        batch = [waiting.popleft()]
        counts = [batch[0].prompt.image_tensors]
        deadline = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch_size:
            if waiting:
                job = waiting.popleft()
            elif len(self._deferred) >= self.max_batch_size:  # jobs wait in the bounded queue, not here
                break
            else:
                remaining = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            if padded_images(counts + [job.prompt.image_tensors]) <= self.max_padded_images:
                batch.append(job)
                counts.append(job.prompt.image_tensors)
                continue
            self._deferred.append(job)
        self._deferred.extend(waiting)  # not looked at (the batch is full): they keep their place
        live = []
        for job in batch:
            if job.cancel.is_set():  # the client left while the job waited
                job.finish("done", "cancelled")
                with self._lock:
                    self.cancelled += 1
            else:
                live.append(job)
        return live

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if not batch:
                continue
            with self._lock:
                self.running = len(batch)
                self.batch_sizes[len(batch)] += 1
            try:
                self._run(batch)
            except Exception as e:  # a bug outside the per-row isolation below: fail this batch, keep serving
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    self._fail(job, e)
            finally:
                with self._lock:
                    self.running = 0

    def _run(self, batch: list[Job]) -> None:
        embeds = self._encode(batch)
        ready = []
        for job, e in zip(batch, embeds):  # per-row checks and generators: outside the shared step
            if job.finished:  # its media failed to encode
                continue
            try:
                request = self._request(job, e)
                self.engine.check(request)
                if job.generator is None:
                    job.generator = self.engine.generator(job.params)
            except Exception as e:
                log.warning("a request was refused before joining its batch: %s", e)
                self._fail(job, e)
                continue
            ready.append((job, request))
        if not ready:
            return
        try:
            self._generate(ready)
        except Exception as e:
            if len(ready) == 1:
                log.exception("generation failed")
                self._fail(ready[0][0], e)
                return
            # Which row is at fault is unknown: each goes on alone; only a row that fails alone gets an error.
            log.warning("a batch of %d failed (%s: %s); running its rows one by one", len(ready), type(e).__name__, e)
            for job, request in ready:
                if job.finished or job.cancel.is_set() or self._stop.is_set():
                    continue
                try:
                    self._generate([(job, self._resume(job, request))])
                except Exception as e1:
                    log.exception("a request failed on its own")
                    self._fail(job, e1)
        for job, _ in ready:  # rows the engine dropped because they were cancelled
            if not job.finished:
                self._done(job, "cancelled")

    def _encode(self, batch: list[Job]) -> list[Tensor | None]:
        """The batch's uncached media through the vision tower at once; if that fails, per job (a job whose
        media fail alone gets the error, the others go on)."""
        try:
            return self.encoder.finish([j.prompt.items for j in batch])
        except Exception as e:
            if len(batch) == 1:
                log.exception("encoding a request's media failed")
                self._fail(batch[0], e)
                return [None]
            log.warning("encoding a batch's media failed (%s: %s); encoding per request", type(e).__name__, e)
        out: list[Tensor | None] = []
        for job in batch:
            out.append(self._encode([job])[0])
        return out

    @staticmethod
    def _request(job: Job, embeds: Tensor | None) -> Request:
        return Request(job.prompt.input_ids, image_embeds=embeds, image_positions=job.prompt.image_positions,
                       params=job.params, cancel=job.cancel, constraint=job.constraint)

    @staticmethod
    def _resume(job: Job, request: Request) -> Request:
        """The job's request continued after the tokens it already sent: those join the prompt, the budget shrinks."""
        n = len(job.tokens)
        if not n:
            return request
        ids = torch.cat([request.input_ids, torch.tensor(job.tokens, dtype=request.input_ids.dtype)])
        params = dataclasses.replace(job.params, max_new_tokens=job.params.max_new_tokens - n,
                                     min_new_tokens=max(0, job.params.min_new_tokens - n))
        return dataclasses.replace(request, input_ids=ids, params=params)

    def _generate(self, rows: list[tuple[Job, Request]]) -> None:
        jobs = [job for job, _ in rows]
        requests = [dataclasses.replace(r, generator=job.generator) for job, r in rows]
        for step in self.engine.stream(requests):
            if self._stop.is_set():
                break
            for event in step:
                r, token = event
                job = jobs[r]
                if job.finished:
                    continue
                job.tokens.append(token)
                job.push("token", token if event.logprobs is None else (token, event.logprobs))
                with self._lock:
                    self.tokens += 1
                if token in job.params.stop_token_ids:
                    self._done(job, "stop")
                elif len(job.tokens) >= job.params.max_new_tokens:
                    self._done(job, "length")

    def _fail(self, job: Job, e: Exception) -> None:
        if not job.finished:
            with self._lock:
                self.failed += 1
        job.finish("error", f"internal error while generating ({type(e).__name__})")

    def _done(self, job: Job, reason: str) -> None:
        with self._lock:
            if (reason == "cancelled" or job.cancel.is_set()) and not job.stop_string:
                self.cancelled += 1
            else:
                self.completed += 1
        job.finish("done", reason)
