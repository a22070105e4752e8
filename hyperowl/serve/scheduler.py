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
    stop_string: bool = False  # the handler ended the answer at a stop string (then set `cancel`)

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
            except Exception as e:  # a bug or out-of-memory: fail this batch, keep serving
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    if not job.finished:
                        with self._lock:
                            self.failed += 1
                    job.finish("error", f"internal error while generating ({type(e).__name__})")
            finally:
                with self._lock:
                    self.running = 0

    def _run(self, batch: list[Job]) -> None:
        embeds: list[Tensor | None] = self.encoder.finish([j.prompt.items for j in batch])
        requests = [Request(j.prompt.input_ids, image_embeds=e, image_positions=j.prompt.image_positions,
                            params=j.params, cancel=j.cancel) for j, e in zip(batch, embeds)]
        counts = [0] * len(batch)
        for step in self.engine.stream(requests):
            if self._stop.is_set():
                break
            for r, token in step:
                job = batch[r]
                if job.finished:
                    continue
                counts[r] += 1
                job.push("token", token)
                if token in job.params.stop_token_ids:
                    self._done(job, "stop")
                elif counts[r] >= job.params.max_new_tokens:
                    self._done(job, "length")
        for job in batch:  # rows the engine dropped because they were cancelled
            if not job.finished:
                self._done(job, "cancelled")
        with self._lock:
            self.tokens += sum(counts)

    def _done(self, job: Job, reason: str) -> None:
        with self._lock:
            if (reason == "cancelled" or job.cancel.is_set()) and not job.stop_string:
                self.cancelled += 1
            else:
                self.completed += 1
        job.finish("done", reason)
