"""Request queue + batching: one worker thread owns the model; two schedulers, continuous (the default) and dynamic.

Design note: the HTTP handlers never touch the model. They put a `Job` (token ids, media items, sampling
parameters, a cancel flag, an asyncio queue) on a bounded queue; when it is full `submit` raises
`QueueFull` and the server answers 429. Each produced token is handed to its job's asyncio queue with
`loop.call_soon_threadsafe` (asyncio queues are not thread-safe). Both schedulers speak the same event
protocol (below), so the routes and the streaming code do not know which one runs.

`ContinuousScheduler` (`hyperowl serve --batching continuous`): the worker loops the engine's steps
(`ContinuousEngine.step`: paged K/V blocks, chunked prefill, prefix reuse). Jobs join between steps and
leave as soon as they finish, so a short request sent during a long answer does not wait for it. A new job's
uncached media go through the vision tower in steps of at most `Encoder.chunk` image tensors between engine
steps (`Encoder.finish_steps`), so running answers keep streaming while a 400-image prompt is encoded. A job
whose client left is aborted in the engine (its blocks freed, also mid-prefill). The engine refuses a
request too large for the whole K/V budget (`add` raises ValueError naming its size and the budget): the job
is *refused* and the handler, which waits for admission before answering (`Job.admitted`), answers 400.
When the budget runs out the engine queues or preempts (recomputes) requests: never an error.

`Scheduler` (dynamic, `--batching dynamic`): the worker waits for the first job, then collects whatever else
arrives within `batch_window_s` (up to `max_batch_size`), has the encoder run the vision tower once on the
batch's uncached media (`Encoder.finish`: the handlers already decoded them), and runs `Engine.stream` on the
whole batch: one left-padded prefill, then one decode step per token for all live rows. Jobs that arrive
while a batch runs wait for the next batch. A batch's visual K/V cache holds every row's images padded to
its largest row's count ([B, N_max*T] per hyper layer), so a request with many images (a long video) batched
with single-image chats would multiply its memory by the batch size: a job joins a batch only while the
batch pads at most `max_padded_images` image slots; the others wait, first in line, for the next batch.
Finished rows leave the batch inside the engine, and so do
cancelled ones: a handler whose client went away sets the job's `threading.Event`, the engine drops that
row at its next decode step (freeing its cache rows), and a job cancelled while still queued is skipped.

Fault isolation (both): one request's failure must not fail the requests running with it. Each job is
checked alone (`Engine.check`) and gets its own seeded generator (`Engine.generator`) before it joins the
shared step; the vision tower runs per job (continuous) or on the batch's media at once but, if that fails,
once per job (dynamic). If a shared step still fails (a fault no check foresaw, or out of memory), every
unfinished request is run again *alone*, continuing from the tokens it already sent (prompt + those tokens
as the new prompt, its own generator, the rest of its budget), so its client sees one unbroken answer; a
request that fails alone is the culprit and gets the error.

Events on a job's queue: ("token", id), then exactly one terminal ("done", finish_reason) or
("error", message). finish_reason: "stop" (a stop token), "length" (max_tokens), "cancelled" (the
client left, or the handler found a stop string and set `stop_string` first: counted as completed).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
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
    content_ids: list[int] = field(default_factory=list)  # the answer's token ids but the stop token (app.answer)
    # Continuous scheduler only: resolved (on the loop) with None once the job is in the engine, or with the
    # engine's reason for refusing it (too large for the whole K/V budget: the handler answers 400).
    admitted: asyncio.Future | None = None
    info: dict | None = None  # the engine's request_info (cached tokens and images, K/V bytes), for usage

    def admit(self, refused: str | None = None) -> None:
        fut = self.admitted
        if fut is None:
            return

        def resolve() -> None:
            if not fut.done():
                fut.set_result(refused)
        try:
            self.loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the event loop is closed
            pass

    def push(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody listens
            pass

    def finish(self, kind: str, value: Any) -> None:
        if not self.finished:
            self.finished = True
            self.push(kind, value)
            self.admit()  # a handler still waiting for admission reads the terminal event next


def padded_images(counts: list[int]) -> int:
    """Image slots a batch with these per-row image counts pads: every row holds as many as the largest."""
    return len(counts) * max(counts, default=0) - sum(counts)


class _Worker:
    """What both schedulers share: the worker thread's lifecycle and how a job ends (counters, one terminal
    event). Subclasses set up their queues, call `_init_worker` and implement `_loop`."""

    def _init_worker(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hyperowl-scheduler", daemon=True)
            self._thread.start()

    def _join(self, timeout: float) -> None:
        """Stop the worker thread (the caller then answers whatever is still waiting)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _fail(self, job: Job, e: Exception) -> None:
        if not job.finished:
            with self._lock:
                self.failed += 1
        job.finish("error", f"internal error while generating ({type(e).__name__})")

    def _done(self, job: Job, reason: str) -> None:
        if job.finished:  # it already had its terminal event (and was counted then)
            return
        with self._lock:
            if (reason == "cancelled" or job.cancel.is_set()) and not job.stop_string:
                self.cancelled += 1
            else:
                self.completed += 1
        job.finish("done", reason)


class Scheduler(_Worker):
    """Dynamic batching (see the module's design note)."""

    batching = "dynamic"

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
        self._init_worker()
        self.running = 0  # rows in the batch being decoded
        self.batch_sizes: Counter[int] = Counter()
        self.completed = self.cancelled = self.failed = self.tokens = 0

    # -- lifecycle ---------------------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        self._join(timeout)
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
            return {"batching": self.batching, "queued": self._queue.qsize() + len(self._deferred),
                    "max_queue": self._queue.maxsize,
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


def media_hashes(prompt: PreparedPrompt) -> tuple[str, ...]:
    """One content hash per image tensor, in placeholder order: the feature cache's key of its media item
    (content hash + pixel recipe + dtype) and the tensor's index in it (a crop, a frame). Prefix reuse over
    images needs them: equal hashes, equal features."""
    return tuple(f"{p.key}#{i}" for p in prompt.items for i in range(p.item.count))


class ContinuousScheduler(_Worker):
    """Continuous batching over `ContinuousEngine` (see the module's design note). Same interface as
    `Scheduler`: start, stop, submit, full, stats."""

    batching = "continuous"

    def __init__(self, model: Any, encoder: Encoder, *, kv_cache_bytes: int | None = None, block_size: int = 16,
                 prefill_chunk: int = 512, max_running: int = 64, max_queue: int = 64,
                 prefix_cache: bool = True) -> None:
        if max_running < 1 or max_queue < 1 or prefill_chunk < 1:
            raise ValueError("max_running, max_queue and prefill_chunk must be >= 1")
        self.model, self.encoder = model, encoder
        self.max_queue = max_queue
        self._engine_args = dict(kv_cache_bytes=kv_cache_bytes, block_size=block_size, prefill_chunk=prefill_chunk,
                                 max_running=max_running, prefix_cache=prefix_cache)
        self.engine = self._new_engine()
        self._solo = Engine(model)  # checks and seeded generators (per job, before it joins the shared step)
        self._queue: queue.Queue[Job] = queue.Queue()  # bounded by `full` (jobs anywhere before running count)
        self._encoding: deque[tuple[Job, Any]] = deque()  # jobs whose media are in the tower, one at a time
        self._jobs: dict[int, Job] = {}  # request id -> job, for jobs in the engine
        self._alone: deque[Job] = deque()  # after a failed shared step: jobs to finish one at a time
        self._ids = 0
        self._init_worker()
        self._engine_stats: dict[str, Any] = self.engine.stats()
        self.completed = self.cancelled = self.failed = self.refused = self.tokens = self.steps = 0
        self.isolations = 0  # shared steps that failed and were resolved by running their jobs alone
        self.engine_s = self.tower_s = 0.0  # worker time in engine steps and in the vision tower (diagnostics)

    def _new_engine(self) -> Any:
        from ..batching import ContinuousEngine

        return ContinuousEngine(self.model, **self._engine_args)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        self._join(timeout)
        pending = [j for j, _ in self._encoding] + list(self._jobs.values()) + list(self._alone)
        self._encoding.clear(), self._jobs.clear(), self._alone.clear()
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:  # whoever is still waiting gets an answer instead of hanging
            job.finish("error", "the server is shutting down")

    # -- producer side (event loop) ------------------------------------------------------------------------
    def _backlog(self) -> int:
        """Jobs not yet running: in the queue, in the tower, waiting in the engine for blocks or a slot."""
        return self._queue.qsize() + len(self._encoding) + len(self._alone) + int(self._engine_stats.get("waiting", 0))

    def full(self) -> bool:
        return self._backlog() >= self.max_queue

    def submit(self, job: Job) -> None:
        if self._stop.is_set():
            raise QueueFull("the server is shutting down")
        with self._lock:
            if self.full():
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            if job.admitted is None:
                job.admitted = job.loop.create_future()
            self._queue.put_nowait(job)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            e = dict(self._engine_stats)
            return {"batching": self.batching, "queued": self._backlog(), "max_queue": self.max_queue,
                    "encoding": len(self._encoding), "running": int(e.get("running", 0)),
                    "waiting": int(e.get("waiting", 0)), "max_running": self._engine_args["max_running"],
                    "kv_cache": {k: e.get(k) for k in ("blocks_total", "blocks_used", "blocks_free", "kv_bytes")}
                    | {"block_size": self._engine_args["block_size"]},
                    "prefix_cache": {"hit_rate": e.get("prefix_hit_rate"), "cached_tokens": e.get("cached_tokens"),
                                     "prefill_tokens": e.get("prefill_tokens")},
                    "preemptions": e.get("preemptions", 0), "steps": self.steps, "completed": self.completed,
                    "cancelled": self.cancelled, "failed": self.failed, "refused": self.refused,
                    "isolations": self.isolations, "tokens": self.tokens, "engine_s": round(self.engine_s, 3),
                    "tower_s": round(self.tower_s, 3)}

    # -- worker thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._take(block=not (self._jobs or self._encoding or self._alone))
                if self._alone:  # a shared step failed: its jobs go on one at a time before anything else
                    self._run_alone(self._alone.popleft())
                    continue
                self._reap()
                self._encode_step()
                if self._jobs:
                    self._step()
            except Exception as e:  # a bug outside the per-job isolation below: fail what runs, keep serving
                log.exception("the continuous scheduler's loop failed")
                for job in list(self._jobs.values()):
                    self._fail(job, e)
                self._jobs.clear()
                self._reset_engine()

    def _take(self, block: bool) -> None:
        """Move newly submitted jobs to the tower (uncached media) or straight into the engine."""
        try:
            job = self._queue.get(timeout=0.1) if block else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            if job.cancel.is_set():  # the client left while the job waited
                self._done(job, "cancelled")
            elif any(p.embeds is None for p in job.prompt.items):
                self._encoding.append((job, self.encoder.finish_steps(job.prompt.items, self.encoder.chunk)))
            else:
                self._admit(job)
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return

    def _encode_step(self) -> None:
        """One step of the tower for the first job in line (at most `Encoder.chunk` image tensors)."""
        if not self._encoding:
            return
        job, steps = self._encoding[0]
        if job.cancel.is_set():
            self._encoding.popleft()
            self._done(job, "cancelled")
            return
        t = time.perf_counter()
        try:
            next(steps)
            self.tower_s += time.perf_counter() - t
        except StopIteration:
            self._encoding.popleft()
            self._admit(job)
        except Exception as e:
            self._encoding.popleft()
            log.exception("encoding a request's media failed")
            self._fail(job, e)

    def _request(self, job: Job) -> Request:
        r = Scheduler._request(job, _features(job.prompt))
        return dataclasses.replace(Scheduler._resume(job, r), generator=job.generator,
                                   media_hashes=media_hashes(job.prompt) if job.prompt.items else None)

    def _admit(self, job: Job) -> int | None:
        """The job into the engine (its request id), or refused (too large for the budget: the handler
        answers 400) or failed (a check no handler could make)."""
        try:
            request = self._request(job)
            self._solo.check(request)
            if job.generator is None:
                job.generator = self._solo.generator(job.params)
                request = dataclasses.replace(request, generator=job.generator)
        except Exception as e:
            log.warning("a request was refused before joining the engine: %s", e)
            self._fail(job, e)
            return None
        self._ids += 1
        rid = self._ids
        try:
            self.engine.add(rid, request)
        except ValueError as e:  # too large for the whole K/V budget (checked above: nothing else is left)
            with self._lock:
                self.refused += 1
            job.finished = True
            job.admit(re.sub(r"^request \S+: ", "", str(e)))  # the engine's id means nothing to the client
            return None
        except Exception as e:
            log.exception("adding a request to the engine failed")
            self._fail(job, e)
            return None
        self._jobs[rid] = job
        self._refresh(rid, job)
        job.admit()
        self._sync_stats()
        return rid

    def _refresh(self, rid: int, job: Job) -> None:
        try:
            job.info = dict(self.engine.request_info(rid))
        except Exception:  # usage falls back to no cached tokens; the answer itself is not affected
            log.debug("request_info(%d) failed", rid, exc_info=True)

    def _reap(self) -> None:
        """Jobs whose client left: out of the engine now (their blocks freed, also mid-prefill)."""
        for rid, job in list(self._jobs.items()):
            if job.cancel.is_set():
                del self._jobs[rid]
                self._abort(rid)
                self._done(job, "cancelled")
                self._sync_stats()

    def _abort(self, rid: int) -> None:
        try:
            self.engine.abort(rid)
        except Exception:
            log.exception("aborting request %d failed; starting a fresh engine", rid)
            self._reset_engine()

    def _step(self) -> None:
        t = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as e:
            self._step_failed(e)
            return
        self.engine_s += time.perf_counter() - t
        self.steps += 1
        self._deliver(events)
        self._sync_stats()

    def _deliver(self, events: list) -> None:
        for ev in events:
            job = self._jobs.get(ev.request_id)
            if job is None:
                continue
            if ev.token is not None and not job.finished:
                job.tokens.append(ev.token)
                job.push("token", ev.token if ev.logprobs is None else (ev.token, ev.logprobs))
                with self._lock:
                    self.tokens += 1
                if len(job.tokens) == 1 or ev.finish:  # the prefill is done: how much of it was reused
                    self._refresh(ev.request_id, job)
            if ev.finish is not None:
                del self._jobs[ev.request_id]
                self._done(job, ev.finish)

    def _step_failed(self, e: Exception) -> None:
        """A shared step failed: which request is at fault is unknown. Each goes on alone (from the tokens it
        already sent); only one that fails alone gets an error."""
        self._salvage()
        jobs = [job for _, job in sorted(self._jobs.items())]
        self._jobs.clear()
        self._reset_engine()  # its state after a failed step is not to be trusted; aborts nothing twice
        if len(jobs) == 1:
            log.exception("generation failed")
            self._fail(jobs[0], e)
            return
        log.warning("a step over %d requests failed (%s: %s); running them one by one", len(jobs), type(e).__name__, e)
        with self._lock:
            self.isolations += 1
        self._alone.extend(jobs)

    def _salvage(self) -> None:
        """Tokens the failed step had already sampled (a decode forward that went through before a prefill
        forward failed) are sent, so each request resumes after them with its random stream where it is."""
        live = getattr(self.engine, "live", {})
        events = []
        for rid, job in self._jobs.items():
            x = live.get(rid)
            for n, t in enumerate(list(getattr(x, "generated", []))[len(job.tokens):], len(job.tokens) + 1):
                finish = "stop" if t in job.params.stop_token_ids else \
                    "length" if n >= job.params.max_new_tokens else None
                events.append(_Event(rid, t, finish))
                if finish:
                    break
        self._deliver(events)

    def _run_alone(self, job: Job) -> None:
        rid = self._admit(job) if not job.finished else None
        if rid is None:
            return
        while rid in self._jobs and not self._stop.is_set():
            if job.cancel.is_set():
                del self._jobs[rid]
                self._abort(rid)
                self._done(job, "cancelled")
                return
            try:
                events = self.engine.step()
            except Exception as e:
                log.exception("a request failed on its own")
                del self._jobs[rid]
                self._reset_engine()
                self._fail(job, e)
                return
            self._deliver(events)
            self._sync_stats()

    def _reset_engine(self) -> None:
        """A fresh engine (all blocks free, prefix cache empty) after a fault left the old one in doubt."""
        self.engine = None  # drop the old K/V pool before the new one is allocated
        self.engine = self._new_engine()
        self._sync_stats()

    def _sync_stats(self) -> None:
        try:
            stats = self.engine.stats()
        except Exception:
            return
        with self._lock:
            self._engine_stats = stats


@dataclass
class _Event:
    request_id: int
    token: int | None
    finish: str | None = None
    logprobs: Any = None  # a salvaged token's logprobs are not kept (its answer's logprobs miss that entry)


def _features(prompt: PreparedPrompt) -> Tensor | None:
    parts = [p.embeds for p in prompt.items]
    return None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts)


def make_scheduler(model: Any, encoder: Encoder, batching: str = "continuous", *, max_batch_size: int = 8,
                   batch_window_s: float = 0.01, max_queue: int = 64, max_padded_images: int = 32,
                   kv_cache_bytes: int | None = None, max_running: int = 64, prefill_chunk: int = 512,
                   prefix_cache: bool = True) -> Scheduler | ContinuousScheduler:
    """The server's scheduler: "continuous" (default) or "dynamic" (today's, for comparison)."""
    if batching == "dynamic":
        return Scheduler(model, encoder, max_batch_size=max_batch_size, batch_window_s=batch_window_s,
                         max_queue=max_queue, max_padded_images=max_padded_images)
    if batching != "continuous":
        raise ValueError(f"batching={batching!r}: 'continuous' or 'dynamic'")
    return ContinuousScheduler(model, encoder, kv_cache_bytes=kv_cache_bytes, max_running=max_running,
                               prefill_chunk=prefill_chunk, max_queue=max_queue, prefix_cache=prefix_cache)
