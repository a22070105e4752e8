"""Live video: frames stream into one kept cache; questions come at any time and prefill only what is new.

Design note
-----------
mPLUG-Owl3 keeps visual features out of the text: each frame is one `<|image|>` token in the text plus its
visual K/V in the hyper layers (models/hyper_attention.py), at a MI-Rope position of its own. So a frame
that arrives after the text can be *appended* to a kept cache (cache.py, "Appending") without touching
what is there, and a `LiveSession` is one growing ChatML conversation held in one `KVCache`:

    <|im_start|>system\\n<|im_end|>\\n<|im_start|>user\\n[<|start_video_frame|>]<|image|><|image|>...
        [<|end_video_frame|>]q1<|im_end|>\\n<|im_start|>assistant\\na1<|im_end|><|endoftext|>
        \\n<|im_start|>user\\n[<|start_video_frame|>]<|image|>...[<|end_video_frame|>]q2<|im_end|>...

(the brackets: 241101 only). Frames received between two questions form one user turn that starts with
them, as a `<|video|>` placeholder over exactly those frames would be expanded by the processor; the
question closes the turn. Hence the exactness contract: with no timestamps, the session's tokens are the
offline chat [user "<|video|>q1" (F1..Fk), assistant a1, user "<|video|>q2" (Fk+1..Fm)] token for token.

Text is tokenized as the processor does it: the rendered prompt split on `<|image|>`, each piece between
two image tokens encoded on its own. The piece after the last image ("open chunk") is only final when
the next image or question arrives, so the session keeps it as text, and on each addition re-encodes it,
keeps the cached tokens that still agree (usually all: the answer's own tokens) and rolls the cache back
past the rest (`KVCache.truncate`, text only; no image sits in the open chunk). That makes the answer
tokens generated live equal the offline tokenization of the answer text even where BPE would merge
differently.

Frames are encoded in a background thread through the pipeline's `Encoder` (the only tower caller) and
appended (visual K/V + placeholder prefill) by that thread under the session lock; `add_frames` returns at
once, `ask` first waits for the frames given before it. A question before any frame is answered text-only
(a user turn without video), like the offline chat without a video would.

Timestamps (`add_frames(..., timestamps=[...])`, and `follow`): each frame is written `[12.0s]<|image|>` (the
stream time in seconds, one decimal), inside the same turn structure; `prompt()` returns the text so far.
A session is in one mode: all frames with times or none; times must increase.

Bounded memory (`memory_gb`): see `_enforce_memory` and docs/live.md. The policy: the newest frames at full
rate, the older ones at one stride (doubled as needed), by evicting frames' visual K/V and their own text
slots (`KVCache.evict`: a copy of what is kept, no re-encoding or re-prefill). Eviction is not exact (text
read while a frame was visible keeps what it read, as any KV eviction). The model is told what it still
sees in one sentence of constant form, written into the open turn right after a thinning (off the
question's path) and evicted by the next thinning, so a question prefills only its own tokens and nothing
in the cache grows with the stream's length. The memory counted is the cache's K/V buffers.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .chat import TextStream, make_params
from .engine import apply_repetition_penalty, sample
from .errors import InputError
from .processing.chat import END_VIDEO_FRAME, ENDOFTEXT, IM_END, IM_START, IMAGE_TOKEN, START_VIDEO_FRAME

log = logging.getLogger(__name__)


BATCH = 16  # frames per tower call in the encoding thread


@dataclass
class Frame:
    index: int  # arrival order, 0-based
    time: Optional[float]  # stream time (seconds), None in the untimed mode
    kept: bool = True  # its visual K/V are still in the cache
    end: int = 0  # its token slot in the cache + 1 (the placeholder's; `LiveSession.ids` indices)
    own: int = 0  # its own tokens ending there (time stamp + placeholder), 0: not separable from a turn header
    parts: tuple = ()  # its own pieces of `LiveSession.parts` (the prompt text)


@dataclass
class Following:
    """A followed source (`LiveSession.follow`): progress, and how it ended."""

    source: str
    offset: float  # session time of the source's time 0
    frames: int = 0  # frames taken from the source (at the session's fps)
    skipped: int = 0  # taken but not added: the model was behind (realtime)
    stream_time: float = 0.0  # session time of the last frame taken
    ended: bool = False  # the source ended normally
    error: Optional[str] = None  # why it stopped otherwise
    done: threading.Event = field(default_factory=threading.Event)
    thread: Optional[threading.Thread] = field(default=None, repr=False, compare=False)  # the reader, once started

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self.done.wait(timeout)


def fmt_time(t: float) -> str:
    return f"[{t:.1f}s]"


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 < 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


class LiveSession:
    """One live conversation over a stream of frames (see the module note). Made by `Pipeline.live()`."""

    def __init__(self, pipe: Any, *, system: str = "", memory_gb: Optional[float] = None,
                 recent_frames: Optional[int] = None, max_queued: int = 64, **sampling: Any) -> None:
        """memory_gb: ceiling on the cache's K/V bytes; None = unbounded. recent_frames: how many newest frames
        always stay at full rate (default: as many as half of what the ceiling leaves to frames holds).
        max_queued: frames waiting for the tower before `add_frames` waits too (their pixels are held).
        sampling: default sampling options of `ask` (max_new_tokens, temperature, ...)."""
        if pipe.family.name.startswith("owl2") or not hasattr(pipe.model.config, "variant"):
            raise InputError(f"live sessions need an mPLUG-Owl3 model (visual K/V outside the text); "
                             f"{pipe.family.name} puts image tokens in the text")
        if pipe.processor is None:
            raise InputError("this model has no tokenizer (no tokenizer.json in its checkpoint directory); "
                             "live sessions need one")
        if memory_gb is not None and memory_gb <= 0:
            raise InputError(f"memory_gb={memory_gb}: must be a positive number of GB")
        self.pipe, self.model, self.proc = pipe, pipe.model, pipe.processor
        self.tokenizer = self.proc.tokenizer
        self.variant = self.model.config.variant
        self.image_id = self.proc.image_token_id
        self.defaults = sampling
        make_params(pipe.stop_ids, **sampling)  # bad defaults fail here
        self.max_bytes = None if memory_gb is None else int(memory_gb * 2**30)
        self.recent_frames = recent_frames
        self.max_queued = max(1, max_queued)
        self.cache = self.model.new_cache(256)
        if self.max_bytes is not None:  # text grows by a quarter when full: the ceiling reserves that much
            self.cache.growth = 1.25
        self.ids: list[int] = []  # token ids in the cache, in order
        self.chunk_start = 0  # where the open chunk (the text after the last image token) starts in ids
        self.chunk_text = ""  # the open chunk's text (tokenized again on each addition)
        self.parts: list[str] = []  # the whole prompt so far, in pieces (prompt()); evicted pieces become ''
        self.frames: list[Frame] = []  # every frame received
        self.timed: Optional[bool] = None  # the mode, fixed by the first frames
        self.in_turn = False  # a user turn with frames is open (the next question closes it)
        self._ceiling_warned = False
        self.thinned = False  # frames were evicted since the model was last told what it still sees
        self.stride = 1  # frames before `cut` are kept at this stride (a power of 2, counted from frame 0)
        self.cut = 0  # frames from here on are kept at full rate
        self.note: Optional[tuple[int, int, tuple]] = None  # the told note inside a turn: (slot, tokens, parts)
        self.answers = 0
        self.last_logits: Optional[torch.Tensor] = None
        self.errors: list[str] = []  # faults of followed sources (the session keeps going)
        self._lock = threading.RLock()  # the cache, ids and text
        self._cv = threading.Condition()
        self._queue: list[tuple[torch.Tensor, Optional[list[float]]]] = []
        self._busy = False
        self._added = self._ingested = 0  # frames queued / appended (or failed) so far
        self._last_time: Optional[float] = None  # the last queued frame's stream time (times must increase)
        self._worker: Optional[threading.Thread] = None
        self._closed = False
        self._followers: list[Following] = []  # followed sources, one running at a time
        self._stop = threading.Event()
        self._add_text(f"{IM_START}system\n{system}{IM_END}")

    # -- frames ----------------------------------------------------------------------------------------------
    def add_frames(self, frames: Any, timestamps: Optional[Sequence[float]] = None) -> int:
        """Queue frames (a PIL image, an HxWx3 uint8 array, pixels [3, S, S], or a list of these, or pixels
        [F, 3, S, S]); they are encoded and appended in a background thread. Returns how many were queued.
        Bad frames raise InputError here (nothing of the call is queued)."""
        pixels = self._pixels(frames)
        n = pixels.shape[0]
        if timestamps is not None:
            timestamps = [float(t) for t in timestamps]
            if len(timestamps) != n:
                raise InputError(f"timestamps: {len(timestamps)} given for {n} frames; give one per frame")
            bad = [j for j, t in enumerate(timestamps) if not math.isfinite(t) or t < 0]
            if bad:
                raise InputError(f"timestamps[{bad[0]}]: {timestamps[bad[0]]} is not a time; give seconds >= 0")
        timed = timestamps is not None
        with self._cv:
            # backpressure: a caller far ahead of the tower waits (frames are pixels until encoded)
            self._cv.wait_for(lambda: self._queued_frames() < self.max_queued or self._closed)
            if self.timed is None:
                self.timed = timed
            elif self.timed != timed:
                raise InputError("timestamps: this session's frames " + ("have" if self.timed else "have no")
                                 + " timestamps; give them for every add_frames call or for none")
            if timed:  # a stream's clock only moves forward: a repeated or earlier time is a sender's bug
                prev = self._last_time
                for j, t in enumerate(timestamps):
                    if prev is not None and t <= prev:
                        raise InputError(f"timestamps[{j}]: {t:g} s is not after the previous frame's {prev:g} s; "
                                         "a stream's times must increase")
                    prev = t
                self._last_time = prev
            self._queue.append((pixels, timestamps))
            self._added += n
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="hyperowl-live", daemon=True)
                self._worker.start()
            self._cv.notify_all()
        return n

    def _pixels(self, frames: Any) -> torch.Tensor:
        size = self.proc.image_size
        if isinstance(frames, torch.Tensor) and frames.dim() == 4:
            items = list(frames)
        elif isinstance(frames, (list, tuple)):
            items = list(frames)
        else:
            items = [frames]
        if not items:
            raise InputError("frames: empty; pass at least one frame")
        out = torch.empty(len(items), 3, size, size)
        for j, f in enumerate(items):
            name = f"frames[{j}]"
            if isinstance(f, torch.Tensor):
                if tuple(f.shape) != (3, size, size) or not f.is_floating_point():
                    raise InputError(f"{name}: pixel values must be float [3, {size}, {size}] (this model's "
                                     f"size), got {f.dtype} {list(f.shape)}; or pass a PIL image or an array")
                out[j] = f
                continue
            if isinstance(f, np.ndarray):
                if f.ndim != 3 or f.shape[2] not in (3, 4) or f.dtype != np.uint8:
                    raise InputError(f"{name}: an array must be HxWx3 (or 4) uint8, got {f.dtype} {list(f.shape)}")
                f = Image.fromarray(f[:, :, :3])
            if not isinstance(f, Image.Image):
                raise InputError(f"{name}: expected a PIL image, an HxWx3 uint8 array or pixel values, "
                                 f"got {type(f).__name__}")
            out[j] = self.proc.frame_pixels([f.convert("RGB") if f.mode != "RGB" else f], 1)[0]
        return out

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed and not self._queue:
                    return
                batch, n = [], 0  # at most BATCH frames per tower call: bounded pixel and activation memory
                while self._queue and (not batch or n + self._queue[0][0].shape[0] <= BATCH):
                    item = self._queue.pop(0)
                    batch.append(item)
                    n += item[0].shape[0]
                self._busy = True
                self._cv.notify_all()
            try:
                pixels = torch.cat([p for p, _ in batch])
                times = None if batch[0][1] is None else [t for _, ts in batch for t in ts]
                feats = self.pipe.encoder.encode_frames(pixels)  # the tower, outside the lock: asks go on meanwhile
                with self._lock:
                    self._append_frames(feats, times)
            except Exception as e:  # the session keeps answering about what it has
                log.error("live: %d frames could not be added: %s", sum(p.shape[0] for p, _ in batch), e)
                self.errors.append(f"frames could not be added: {e}")
            finally:
                with self._cv:
                    self._busy = False
                    self._ingested += sum(p.shape[0] for p, _ in batch)
                    self._cv.notify_all()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every frame queued so far is in the cache (not those queued meanwhile: a followed
        source never stops). False on timeout."""
        with self._cv:
            target = self._added
            return self._cv.wait_for(lambda: self._ingested >= target, timeout)

    def _append_frames(self, feats: torch.Tensor, times: Optional[list[float]]) -> None:
        heads, stamps = [], []
        for j in range(feats.shape[0]):
            head = ""
            if not self.in_turn:
                head = f"\n{IM_START}user\n" + (START_VIDEO_FRAME if self.variant == "241101" else "")
                self.in_turn = True
            heads.append(head)
            stamps.append(fmt_time(times[j]) if times is not None else "")
        self._prefill([h + t for h, t in zip(heads, stamps)], feats, logits=False)
        base = len(self.frames)
        for j, (end, count, parts) in enumerate(self._placed):
            # a frame's own text (time stamp + placeholder) can be evicted with it when it has tokens of its own
            if not stamps[j]:
                own, parts = 1, parts[1:]
            elif not heads[j] and count >= 0:
                own = count + 1
            else:  # its stamp shares tokens with the turn header: its text stays
                own, parts = 0, ()
            self.frames.append(Frame(base + j, None if times is None else times[j], end=end, own=own, parts=parts))
        self._enforce_memory()
        if self.thinned:
            self._tell()

    def _tell(self) -> None:
        """Tell the model what it still sees, in the open turn right after the frames (not on a question's
        path), as a piece tokenized on its own, so that the next eviction removes it with the frames it
        described (a newer note replaces it: the text holds one, of constant size)."""
        self._prefill([self.visible_note() + "\n"], None, logits=False)
        self.note = (len(self.ids), len(self.ids) - self.chunk_start, (len(self.parts) - 1,))
        self.chunk_start, self.chunk_text = len(self.ids), ""
        self.thinned = False

    # -- sources ------------------------------------------------------------------------------------------------
    def follow(self, source: "str | os.PathLike[str]", fps: float = 1.0, realtime: bool = True,
               stall_timeout: float = 10.0, max_queue: int = 8) -> "Following":
        """Follow a video file, a camera (/dev/videoN, through PyAV's v4l2) or a stream URL (rtsp, http(s), ...)
        in a background thread, `fps` frames per second of stream time, with their stream times (plus where
        the session's times were when it started). realtime: a file is played at its pace (frames the tower
        cannot keep up with are skipped, at most `max_queue` wait), else as fast as it decodes (nothing is
        skipped). A source that cannot be opened raises InputError here; one that stalls, breaks off or ends
        later is reported (log, `errors`, the handle) and the session keeps answering about what it has.
        One source at a time: a session has one clock, and two sources would interleave their times (refused
        while another is still running)."""
        from .processing.video import iter_stream, open_stream

        source = os.fspath(source)
        if fps <= 0:
            raise InputError(f"fps={fps}: must be a positive number of frames per second")
        handle = Following(source, 0.0)
        with self._lock:  # check and claim together: two concurrent calls cannot both pass
            running = next((h.source for h in self._followers if not h.done.is_set()), None)
            if running is not None:
                raise InputError(f"follow '{source}': this session still follows '{running}'; a session takes one "
                                 "source at a time (wait for it to end, or open another session)")
            self._followers.append(handle)
        try:
            container = open_stream(source, stall_timeout)
            if self.timed is False:
                container.close()
                raise InputError("follow: this session's frames have no timestamps; follow a source in a new "
                                 "session")
        except BaseException:
            with self._lock:
                self._followers.remove(handle)
            raise
        last = self._last_time
        handle.offset = 0.0 if last is None else last + 1.0 / fps

        def run() -> None:
            try:
                for t, image in iter_stream(source, fps, realtime, self._stop, stall_timeout, container):
                    handle.stream_time = handle.offset + t
                    handle.frames += 1
                    if not realtime:
                        with self._cv:  # backpressure: decode no further ahead than the tower
                            self._cv.wait_for(lambda: self._queued() < max_queue or self._stop.is_set())
                    elif self._queued() >= max_queue:
                        handle.skipped += 1
                        if handle.skipped == 1:
                            log.warning("live: the model cannot keep up with '%s' at %g fps; skipping frames",
                                        source, fps)
                        continue
                    self.add_frames(image, timestamps=[handle.offset + t])
                handle.ended = True
                log.info("live: '%s' ended after %d frames (%.1fs)", source, handle.frames, handle.stream_time)
            except Exception as e:  # a stall, a broken stream, a bad frame: report it, keep the session
                handle.error = str(e)
                self.errors.append(handle.error)
                log.error("live: %s", handle.error)
            finally:
                handle.done.set()

        handle.thread = threading.Thread(target=run, name=f"hyperowl-follow:{source}", daemon=True)
        handle.thread.start()
        return handle

    def _queued(self) -> int:
        return self._queued_frames() + (1 if self._busy else 0)

    def _queued_frames(self) -> int:
        return sum(p.shape[0] for p, _ in self._queue)

    # -- text and the cache ----------------------------------------------------------------------------------
    def _add_text(self, s: str) -> int:
        self.chunk_text += s
        self.parts.append(s)
        return len(self.parts) - 1

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False).ids if s else []

    def _prefill(self, pieces: list[str], feats: Optional[torch.Tensor], logits: bool) -> Optional[torch.Tensor]:
        """Append text pieces, each followed by one image (feats[j]) when feats is given, else one text piece
        with no image; run the new tokens (and images) through the model into the cache. Records in `_placed`,
        per image: its slot + 1, how many tokens its piece took (-1: tokenized together with the text before
        it), and the indices of its piece and its placeholder in `parts`."""
        fresh = self.chunk_text == ""  # nothing open before pieces[0]: it is tokenized on its own
        first = self._add_text(pieces[0])
        want = self._encode(self.chunk_text)
        have = self.ids[self.chunk_start :]
        same = 0
        while same < min(len(want), len(have)) and want[same] == have[same]:
            same += 1
        if same < len(have):  # cached tokens the full text tokenizes differently: roll them back
            self.cache.truncate(self.cache.length - (len(have) - same))
            del self.ids[self.chunk_start + same :]
        new = want[same:]
        positions, placed = [], []
        if feats is not None:
            for j, piece in enumerate(pieces):
                part, count = first, len(new) if fresh else -1
                if j:
                    part = self._add_text(piece)
                    tokens = self._encode(piece)
                    new += tokens
                    count = len(tokens)
                positions.append(len(new))
                new.append(self.image_id)
                self.parts.append(IMAGE_TOKEN)
                self.chunk_text = ""
                placed.append((len(self.ids) + len(new), count, (part, len(self.parts) - 1)))
        self._placed = placed
        if not new:
            return None
        ids = torch.tensor([new], dtype=torch.long, device=self.model.device)
        kw: dict[str, Any] = {}
        if feats is not None:
            kw = dict(image_embeds=feats, image_positions=torch.tensor([positions], device=self.model.device))
        with torch.no_grad():
            out = self.model(ids, cache=self.cache, last_logits_only=True, **kw)
        self.ids += new
        if feats is not None:
            self.chunk_start = len(self.ids)
        return out.logits[:, -1].float() if logits else None

    # -- questions -------------------------------------------------------------------------------------------
    def ask(self, question: str, stream: bool = False, **sampling: Any) -> str | Iterator[str]:
        """Answer about everything seen so far (waits for the frames already given). stream=True: the
        answer's text pieces as they are generated. sampling: max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, min_new_tokens, seed (greedy by default)."""
        if not isinstance(question, str):
            raise InputError(f"question: expected a string, got {type(question).__name__}")
        if IMAGE_TOKEN in question or "<|video|>" in question:
            raise InputError("question: must not contain <|image|> or <|video|>; frames come through add_frames")
        params = make_params(self.pipe.stop_ids, **{**self.defaults, **sampling})
        self.flush()
        pieces = self._answer(question, params)
        return pieces if stream else "".join(pieces)

    def _answer(self, question: str, params) -> Iterator[str]:
        with self._lock:
            if self.in_turn:
                head = END_VIDEO_FRAME if self.variant == "241101" else ""
            else:
                head = f"\n{IM_START}user\n"
            if self.thinned:  # frames were evicted since the last question: say what is still visible
                head += self.visible_note() + "\n"
                self.thinned = False
            self.in_turn = False
            logits = self._prefill([f"{head}{question}{IM_END}\n{IM_START}assistant\n"], None, logits=True)
            self.last_logits = logits[0].clone()  # the question's next-token logits (tests compare them)
            text = TextStream(self.tokenizer, params.stop_token_ids)
            answer: list[str] = []
            dev = self.model.device
            gen = None
            if params.temperature > 0:
                gen = torch.Generator(device=dev)
                gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**31, (1,))))
            vocab = self.model.config.vocab_size
            seen = None
            if params.repetition_penalty != 1.0:
                seen = torch.zeros(1, vocab, dtype=torch.bool, device=dev)
                seen[0, torch.tensor(self.ids, device=dev).clamp(max=vocab - 1)] = True
            penalty = torch.tensor([params.repetition_penalty], device=dev)
            try:
                for count in range(1, params.max_new_tokens + 1):
                    if seen is not None:
                        logits = apply_repetition_penalty(logits, seen, penalty)
                    if count <= params.min_new_tokens and params.stop_token_ids:
                        logits[0, list(params.stop_token_ids)] = float("-inf")
                    token = int(sample(logits, [params], [gen])[0])
                    piece = text.push(token)
                    if piece:
                        answer.append(piece)
                        yield piece
                    if token in params.stop_token_ids or count == params.max_new_tokens:
                        break
                    if seen is not None:
                        seen[0, token] = True
                    with torch.no_grad():
                        logits = self.model(torch.tensor([[token]], device=dev), cache=self.cache).logits[:, -1].float()
                    self.ids.append(token)
            finally:  # also when a stream is abandoned: the turn ends with what was said
                self._add_text("".join(answer) + f"{IM_END}{ENDOFTEXT}")
                self.answers += 1
                self._enforce_memory()

    # -- bounded memory ------------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        return self.cache.nbytes()

    def _enforce_memory(self) -> None:
        """Over the ceiling: the newest `window` frames stay at full rate; the older ones (before `cut`) are kept
        at one stride, a power of 2 counted from frame 0, doubled as needed so that they fill at most half of
        what the ceiling leaves them: the next thinning is then that many frames away (each one copies the
        kept K/V once). So the history is evenly thinned and always two runs (the note stays one sentence).
        Evicted frames lose their visual K/V and their own text slots (time stamp, placeholder), and the last
        note about what is visible goes with them (a new one is told)."""
        if self.max_bytes is None:
            return
        # the text capacity's next growth (a question, an answer) must fit too: count it in now
        grow = int((self.cache.growth - 1) * (self.memory_bytes() - self.cache.visual_bytes()))
        limit = self.max_bytes - grow
        if self.memory_bytes() <= limit:
            return
        kept = [f for f in self.frames if f.kept]
        visual = self.cache.visual_bytes()
        text = self.memory_bytes() - visual
        per_frame = max(1, visual // max(1, len(kept)))
        room = max(0, (limit - text) // per_frame)  # frames the ceiling leaves room for
        window = self.recent_frames if self.recent_frames is not None else max(1, room // 2)
        target = max(1, (room - window) // 2)  # old frames kept after a thinning
        changed = False
        while self.memory_bytes() > limit:
            cut = max(self.cut, len(self.frames) - window)
            stride = self.stride
            while stride < cut and -(-cut // stride) > target:
                stride *= 2
            drop = [f for f in self.frames if f.kept and f.index < cut and f.index % stride]
            if not drop:
                if stride >= cut:  # only the first frame is older than the window
                    if not self._ceiling_warned:
                        self._ceiling_warned = True
                        log.warning("live: the memory ceiling %.3f GB cannot be held: the text K/V (%.3f GB) and "
                                    "the %d most recent frames need more; raise memory_gb",
                                    self.max_bytes / 2**30, text / 2**30, window)
                    break
                target = max(1, -(-cut // stride) // 2)
                continue
            self.stride, self.cut = stride, cut
            self._evict(drop)
            changed = True
        self.thinned |= changed

    def _evict(self, drop: list[Frame]) -> None:
        """Drop these frames' visual K/V and own text slots, and the told note, from the cache and the text."""
        cached = [f for f in self.frames if f.kept]  # the cache's images, in order
        gone = {f.index for f in drop}
        keep = torch.tensor([i for i, f in enumerate(cached) if f.index not in gone], dtype=torch.long)
        slots: list[int] = []
        for f in drop:
            f.kept = False
            slots += range(f.end - f.own, f.end)
            for p in f.parts:
                self.parts[p] = ""
        if self.note is not None:
            end, n, parts = self.note
            slots += range(end - n, end)
            for p in parts:
                self.parts[p] = ""
            self.note = None
        slots.sort()
        assert self.cache.length == len(self.ids)
        if not slots:
            self.cache.evict(keep, None)
            return
        removed = set(slots)
        self.cache.evict(keep, torch.tensor([k for k in range(len(self.ids)) if k not in removed], dtype=torch.long))
        self.ids = [t for k, t in enumerate(self.ids) if k not in removed]
        for f in self.frames:  # slots after evicted ones move down
            f.end -= bisect.bisect_left(slots, f.end)
        self.chunk_start -= bisect.bisect_left(slots, self.chunk_start)

    def visible_note(self) -> str:
        """What the model is told after frames were evicted: the frames it still sees, as (at most) two runs,
        the older frames at one stride and the newest at full rate."""
        kept = [f for f in self.frames if f.kept]
        old = [f for f in kept if f.index < self.cut]
        recent = [f for f in kept if f.index >= self.cut]

        def at(f: Frame) -> str:
            return f"{f.time:.1f}s" if f.time is not None else f"frame {f.index + 1}"

        runs = []
        if len(old) == 1:
            runs.append(f"the frame at {at(old[0])}")
        elif old:
            runs.append(f"every {ordinal(self.stride)} frame from {at(old[0])} to {at(old[-1])}")
        if recent:
            runs.append(f"every frame from {at(recent[0])} on")
        return f"(Frames were dropped to save memory; still visible: {', and '.join(runs) or 'none'}.)"

    # -- state --------------------------------------------------------------------------------------------------
    def prompt(self) -> str:
        """The conversation text so far (as the model reads it)."""
        with self._lock:
            return "".join(self.parts)

    def status(self) -> dict:
        kept = sum(f.kept for f in self.frames)
        last = self.frames[-1].time if self.frames else None
        return {"frames_seen": len(self.frames), "frames_kept": kept, "memory_bytes": self.memory_bytes(),
                "stream_time": last, "queued": sum(p.shape[0] for p, _ in self._queue), "answers": self.answers,
                "errors": list(self.errors)}

    def close(self) -> None:
        """Stop followed sources and the encoding thread (queued frames are still added first)."""
        self._stop.set()
        for h in self._followers:
            if h.thread is not None:
                h.thread.join()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join()

    def __enter__(self) -> "LiveSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
