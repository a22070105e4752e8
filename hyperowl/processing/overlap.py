"""Decode media in a background thread while the vision tower encodes what is already decoded.

Design note. A long video costs two things before the first token: decoding and resizing the sampled
frames (PyAV, Pillow: they release the GIL) and running the vision tower on them (torch). Done one after
the other, the tower waits for the last frame and every frame's pixels are held at once (400 frames at
384 px are 0.7 GB of float32). `encode_overlapped` runs the producer (an iterator of pixel chunks) in one
thread and the encoder in the caller's thread, with a queue of at most `depth` chunks between them: the
tower works on chunk k while chunk k+1 decodes, and at most depth + 2 chunks of pixels exist at any time,
whatever the video's length. Given the number of frames (`total`), the embeddings are written into one
tensor as they come, so they too exist once (not once as chunks and again as their concatenation). Errors
on either side stop both and are raised in the caller (an InputError from the decoder stays an
InputError); the thread never outlives the call.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Callable, Iterable, Iterator, Union

import torch
from torch import Tensor

_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last one shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def encode_overlapped(chunks: Iterable[Tensor], encode: Callable[[Tensor], Tensor], depth: int = 2,
                      threaded: bool = True, total: Union[int, Callable[[], int], None] = None) -> Tensor:
    """torch.cat([encode(c) for c in chunks]), with `chunks` produced in a background thread (see the note).

    threaded=False: the same chunk by chunk in the caller's thread (bounded memory, no overlap). On a CPU-only
    machine the decoder and the tower compete for the same cores: there, measured on 2 cores
    (bench/bench_video_encode.py), the thread made it slower, not faster.
    total: the number of rows all chunks' outputs add up to (an int, or a function asked once the first chunk
    is encoded, e.g. a video sampler's frame count). Given, each output is copied into one preallocated tensor
    as it comes, so the embeddings exist once instead of twice (the chunk list, then its cat)."""
    if depth < 1:
        raise ValueError(f"depth={depth}: must be at least 1")
    sink = _Rows(total)
    if threaded:
        _encode_in_thread(chunks, encode, depth, sink.add)
    else:
        for c in chunks:
            sink.add(encode(c))
    return sink.result()


class _Rows:
    """Collects encoded chunks along dim 0: into one preallocated tensor when the total is known."""

    def __init__(self, total: Union[int, Callable[[], int], None]) -> None:
        self.total, self.parts, self.out, self.filled = total, [], None, 0

    def add(self, x: Tensor) -> None:
        if self.total is None:
            self.parts.append(x)
            return
        if self.out is None:
            n = self.total() if callable(self.total) else self.total
            if x.shape[0] == n:  # one chunk holds everything: keep it as is
                self.out, self.filled = x, n
                return
            self.out = x.new_empty((n, *x.shape[1:]))
        end = self.filled + x.shape[0]
        if end > self.out.shape[0]:
            raise ValueError(f"encode_overlapped: the chunks hold more than total={self.out.shape[0]} rows")
        self.out[self.filled:end] = x
        self.filled = end

    def result(self) -> Tensor:
        if self.total is None:
            if not self.parts:
                raise ValueError("encode_overlapped: no chunks were produced")
            return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        if self.out is None:
            raise ValueError("encode_overlapped: no chunks were produced")
        if self.filled != self.out.shape[0]:
            raise ValueError(f"encode_overlapped: the chunks hold {self.filled} rows, not total={self.out.shape[0]}")
        return self.out


def _encode_in_thread(chunks: Iterable[Tensor], encode: Callable[[Tensor], Tensor], depth: int,
                      emit: Callable[[Tensor], None]) -> None:
    """emit(encode(c)) for c in chunks, the chunks produced in a thread, at most `depth` of them queued."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():  # a bounded put that gives up when the consumer has stopped
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for c in chunks:
                if not put(c):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, re-raised there
            put(_Failed(exc))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:  # a generator: release its file now, from its own thread
                close()

    worker = threading.Thread(target=produce, name="media-decode", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            emit(encode(item))
            del item  # drop this chunk's pixels before waiting for the next one
    finally:
        stop.set()
        worker.join()
