"""Continuous batching over the paged KV cache: requests join and leave between steps. Knows ids, never a tokenizer.

Design note
-----------
`ContinuousEngine` is driven by its caller (a server's scheduler thread, a test): `add` queues a request,
`step` runs one scheduling step and returns the tokens it produced, `abort` drops a request at once. It holds
no lock and starts no thread; the caller serialises the calls.

A step:
1. cancelled requests (`Request.cancel` set) leave, their blocks freed;
2. waiting requests are admitted in arrival order while the pool has room for their whole prompt (text
   blocks and the images' visual K/V, after prefix reuse) plus one block for every running row that starts a
   new block next step, up to `max_running`. A request whose leading blocks equal those a request being
   prefilled has yet to register waits (others are admitted past it) until they are registered, then reuses
   them by the prefix match: n > 1, or a burst with one long system prompt or video, prefills them once;
3. one decode forward for every row past its prompt (one token each; rows of different lengths and image
   counts share it through `PagedView`, paged_cache.py), a row about to fill its last block gets a new one,
   preempting the newest request when the pool is full. Rows whose sizes differ so much that padding them
   to each other costs more than another pass over the weights (or passes `gather_bytes`) are split into a
   few forwards. Each group keeps its gathered K/V across steps while its rows stay (`_keeps`, bounded by
   `keep_bytes`): a step appends one slot per row instead of re-gathering every row's past and images;
4. prefill: at most `prefill_chunk` prompt slots (text slots; Owl2's visual rows count, Owl3's images cost
   no sequence slots and go whole with their placeholder's chunk), in admission order (chunked prefill: a
   long prompt takes several steps, running rows keep decoding meanwhile). The images whose placeholders lie
   in the chunk go with it and are appended to the request's visual K/V, as live video appends frames (their
   MI-Rope position and visibility come from their own placeholder, so chunking is exact). The step's chunks
   of several requests share a forward (batched prefill): left-padded to the longest, as the offline engine
   pads a batch, with each row's own images (any number, `PagedView.append_images` keeps each row's images
   back to back); they are split into a few forwards where padding costs more than a forward
   (`_prefill_groups`). A request whose prompt is done samples its first token from its row's last logits.

Sampling is `Engine.stream`'s: `sample`, the repetition penalty over prompt + generated ids, stops forbidden
until `min_new_tokens`, each sampling row's own generator (`Request.generator`, or `Engine.generator`), so a
request's tokens are its solo `Engine.generate` tokens whatever else runs beside it.

Preemption is by recomputation: the newest request's blocks are released and it goes back to the front of
the queue with its prompt + generated tokens as the prompt to recompute (its sampling state and generator
continue: the same random stream). Its full blocks usually survive in the prefix cache, so the recompute is
mostly a prefix hit. `add` refuses a request whose prompt + max_new_tokens cannot fit the whole budget, so a
request alone always fits: never an out-of-memory error, never a lost request.

Prefix reuse: full blocks get a content key, a hash chain over (parent key, the block's token ids, the media
hashes of the images whose placeholders or visual rows lie in it). Without `Request.media_hashes`, a block
holding an image is not shareable and the chain stops there. A new request walks its chain through the
registered blocks and reuses the matched text blocks and, for Owl3, the visual K/V of the images placed in
them: an image's keys depend only on its features and its MI-Rope position (the placeholder's), and the
matched text K/V only on earlier tokens and images (240728: an image is seen strictly after its
placeholder; 241101: the placeholder sees it, and its hash is in the placeholder's block). At least the last
prompt token is always recomputed (its logits give the first token); Owl2 matches only up to a token
boundary (an image's rows are written by one forward). Generated tokens' blocks are registered too, so a
chat's next turn reuses the previous answer. A leaving request's last, partly filled block is kept as well
(text only, keyed by its parent's key with its tokens, `_keep_partial`): a request continuing those tokens
copies the common slots into its own next block, so a next turn recomputes only its new tokens and the last
answer token (never fed), not up to block_size - 1 more.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Hashable

import torch
from torch import Tensor

from .engine import Engine, Request, TokenLogprobs, next_tokens
from .paged_cache import Block, BlockManager, KeptKV, PagedSeq, PagedView, default_kv_cache_bytes

log = logging.getLogger(__name__)

WAITING, PREFILL, DECODE = "waiting", "prefill", "decode"
# A forward's fixed cost beyond reading the weights, in bytes-moved equivalents, for deciding whether rows of
# very different sizes decode together (ContinuousEngine._decode_groups). CPU: Python and small ops, ~5-10 ms a
# forward of the embedded model, i.e. ~64 MB of copying (measured, 16 mixed rows with kept gathered K/V: one
# padded forward 29 ms, three forwards 50 ms; when every step re-gathered, three forwards were cheaper). CUDA:
# kernel launches and Python, a few ms per forward, i.e. GBs at HBM speed: rows are split only for large padding.
FORWARD_OVERHEAD_BYTES = {"cpu": 64 << 20, "cuda": 8 << 30}
# Prefill forwards over several requests' chunks (ContinuousEngine._prefill_groups): a forward's fixed cost in
# query-token equivalents (CPU: Python and small ops of a forward of the embedded model ~ that many tokens' compute;
# CUDA: a few ms of launches and weight reads, thousands of tokens' worth), and how many padded past slots of a row
# (gathered K/V, read by the attention) cost as much as one padded query token.
PREFILL_FORWARD_TOKENS = {"cpu": 64, "cuda": 4096}
PREFILL_KEY_DIV = 16
# Text slots a decode group's kept K/V (paged_cache.KeptKV) grow by when full: a regrow copies the buffers once.
KEEP_GROW = 64


@dataclass
class StepEvent:
    request_id: Hashable
    token: int | None  # None: the request left without a token (cancelled)
    finish: str | None = None  # None (more to come), "stop", "length" or "cancelled"
    logits: Tensor | None = None  # [V] float32 the token was sampled from (before penalties), if keep_logits
    logprobs: TokenLogprobs | None = None  # when the request asked (SamplingParams.logprobs)


class _Live:
    """One request's state in the engine (waiting, prefilling or decoding)."""

    def __init__(self, rid: Hashable, req: Request, gen, vocab: int, visual_in_text: bool,
                 device: torch.device) -> None:
        self.rid, self.req, self.params, self.gen = rid, req, req.params, gen
        self.prompt = [int(t) for t in req.input_ids.tolist()]
        self.tokens = list(self.prompt)  # prompt + generated
        self.generated: list[int] = []
        pos = [] if req.image_positions is None else [int(p) for p in req.image_positions.flatten().tolist()]
        self.image_tok = pos  # increasing (checked by ContinuousEngine.add)
        self.image_of = {p: j for j, p in enumerate(self.image_tok)}
        t = int(req.image_embeds.shape[1]) if req.image_embeds is not None and len(self.image_tok) else 1
        width = t if visual_in_text else 1  # Owl2: an image's rows are sequence slots
        self.starts = [0]  # slot where each token starts (+ the end)
        for i in range(len(self.tokens)):
            self.starts.append(self.starts[-1] + (width if i in self.image_of else 1))
        self.seq: PagedSeq | None = None
        self.done = 0  # tokens whose K/V are in the cache
        self.keys: list[bytes | None] = []  # content key of each full block written so far
        self.state = WAITING
        self.admitted = -1
        self.info = dict(prompt_tokens=len(self.prompt), cached_tokens=0, cached_images=0, kv_bytes=0)
        self.first_admission = True
        self.chain: list[bytes | None] = []  # content keys of its full blocks (ContinuousEngine._chain)
        self.seen = None
        if self.params.repetition_penalty != 1.0:
            ids = req.input_ids.to(device=device, dtype=torch.long)
            ids = ids[(ids >= 0) & (ids < vocab)]
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)  # prompt + generated ids
            self.seen[ids] = True

    def slots(self, n_tokens: int | None = None) -> int:
        return self.starts[len(self.tokens) if n_tokens is None else n_tokens]

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self.generated.append(token)
        self.starts.append(self.starts[-1] + 1)


class ContinuousEngine:
    """See the module note. `kv_cache_bytes` None: `default_kv_cache_bytes` of the model's device."""

    def __init__(self, model, kv_cache_bytes: int | None = None, block_size: int = 16, prefill_chunk: int = 512,
                 max_running: int = 64, prefix_cache: bool = True, keep_logits: bool = False,
                 gather_bytes: int = 256 << 20, keep_bytes: int = 256 << 20) -> None:
        if block_size < 1 or prefill_chunk < 1 or max_running < 1:
            raise ValueError("block_size, prefill_chunk and max_running must be >= 1")
        self.model = model
        self.solo = Engine(model)  # request checks and generators, as the offline engine makes them
        cfg = model.config
        self.vocab = cfg.vocab_size
        self.visual_in_text = not hasattr(cfg, "is_hyper")  # Owl2: visual rows in the sequence
        visual_layers = [] if self.visual_in_text else [i for i in range(cfg.num_layers) if cfg.is_hyper(i)]
        image_tokens = None if self.visual_in_text else cfg.vision.tokens_per_image
        unit_bytes = 2 * cfg.num_kv_heads * block_size * cfg.head_dim * torch.empty(0, dtype=model.dtype).element_size()
        budget = default_kv_cache_bytes(model.device) if kv_cache_bytes is None else int(kv_cache_bytes)
        self.blocks = BlockManager(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, budget // unit_bytes,
                                   model.dtype, model.device, visual_layers, image_tokens)
        self.block_size, self.prefill_chunk, self.max_running = block_size, prefill_chunk, max_running
        self.prefix_cache, self.keep_logits = prefix_cache, keep_logits
        self.gather_bytes = gather_bytes  # bound on one layer's transient gathered K/V in a decode step
        # bound on the decode groups' kept gathered K/V (all layers; beyond it a group gathers every step)
        self.keep_bytes = keep_bytes
        self._kept: list[KeptKV] = []
        self._weight_bytes = sum(p.numel() * p.element_size() for p in model.decoder.parameters())
        if getattr(model, "lm_head", None) is not None:
            self._weight_bytes += sum(p.numel() * p.element_size() for p in model.lm_head.parameters())
        self.waiting: deque[_Live] = deque()
        self.running: list[_Live] = []  # admitted (prefilling or decoding), in admission order
        self.live: dict[Hashable, _Live] = {}
        self.finished: OrderedDict[Hashable, dict] = OrderedDict()  # request_info of the last finished requests
        self._order = itertools.count()
        # prefill_forwards / prefill_rows: forwards over prompt chunks and the chunks they carried (batched prefill)
        self.counters = dict(prefill_tokens=0, cached_tokens=0, prompt_slots=0, preemptions=0, prefill_forwards=0,
                             prefill_rows=0)
        log.info("paged KV cache: %d blocks of %d slots (%.1f MB)", self.blocks.num_units, block_size,
                 self.blocks.num_units * unit_bytes / 2**20)

    # -- the public API --------------------------------------------------------------------------------------
    def add(self, request_id: Hashable, request: Request) -> None:
        """Queue a request. ValueError if it cannot go through the model or cannot fit the whole KV budget."""
        if request_id in self.live:
            raise ValueError(f"request {request_id!r} is already in the engine")
        request = self.solo._with_features(request)
        self.solo.check(request, request_id)
        n_img = 0 if request.image_positions is None else int(request.image_positions.numel())
        if n_img:
            pos = request.image_positions.flatten()
            if bool((pos[1:] <= pos[:-1]).any()) or int(pos.min()) < 0 or int(pos.max()) >= request.input_ids.numel():
                raise ValueError(f"request {request_id}: image_positions must be increasing token indices of its "
                                 f"{request.input_ids.numel()} ids, got {pos.tolist()}")
        if request.media_hashes is not None and len(request.media_hashes) != n_img:
            raise ValueError(f"request {request_id}: {len(request.media_hashes)} media hashes for {n_img} images")
        if n_img and not self.visual_in_text and int(request.image_embeds.shape[1]) != self.blocks.image_tokens:
            raise ValueError(f"request {request_id}: images of {int(request.image_embeds.shape[1])} tokens, the model "
                             f"takes {self.blocks.image_tokens}")
        gen = request.generator
        if gen is None and request.params.temperature > 0:
            gen = self.solo.generator(request.params)
        x = _Live(request_id, request, gen, self.vocab, self.visual_in_text, self.model.device)
        need = self._units_for(x.slots() + request.params.max_new_tokens, n_img)
        if need > self.blocks.num_units:
            mb = self.blocks.unit_bytes / 2**20
            raise ValueError(f"request {request_id}: needs {need} KV blocks ({need * mb:.1f} MB) for its "
                             f"{x.slots()} prompt slots, {n_img} images and max_new_tokens "
                             f"{request.params.max_new_tokens}; the KV budget holds {self.blocks.num_units} "
                             f"({self.blocks.num_units * mb:.1f} MB)")
        self.live[request_id] = x
        self.waiting.append(x)

    def abort(self, request_id: Hashable) -> None:
        """Drop a request now (waiting, prefilling or decoding); its blocks are freed. Unknown ids are ignored."""
        x = self.live.get(request_id)
        if x is not None:
            self._leave(x)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        m = self.blocks
        c = self.counters
        return dict(blocks_total=m.num_units, blocks_used=m.used_units(), blocks_free=m.available(),
                    blocks_cached=m.evictable_units, block_size=self.block_size, running=len(self.running),
                    waiting=len(self.waiting), prefill_tokens=c["prefill_tokens"], cached_tokens=c["cached_tokens"],
                    prefix_hit_rate=c["cached_tokens"] / c["prompt_slots"] if c["prompt_slots"] else 0.0,
                    preemptions=c["preemptions"], kv_bytes=m.num_units * m.unit_bytes,
                    prefill_forwards=c["prefill_forwards"], prefill_rows=c["prefill_rows"])

    def request_info(self, request_id: Hashable) -> dict:
        """prompt_tokens, cached_tokens (prompt tokens reused from the prefix cache at admission), cached_images
        and kv_bytes (bytes of the blocks the request references; at its end for a finished one)."""
        x = self.live.get(request_id)
        if x is not None:
            return dict(x.info, kv_bytes=x.seq.units() * self.blocks.unit_bytes if x.seq else 0)
        if request_id in self.finished:
            return dict(self.finished[request_id])
        raise KeyError(request_id)

    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        events: list[StepEvent] = []
        for x in list(self.waiting) + self.running:
            if x.req.cancel is not None and x.req.cancel.is_set():
                self._leave(x)
                events.append(StepEvent(x.rid, None, "cancelled"))
        self._admit()
        self._decode(events)
        self._prefill(events)
        return events

    # -- memory ----------------------------------------------------------------------------------------------
    def _units_for(self, slots: int, images: int) -> int:
        return math.ceil(slots / self.block_size) * self.blocks.num_layers + images * self.blocks.image_units()

    def _leave(self, x: _Live) -> None:
        if x.seq is not None:
            x.info["kv_bytes"] = x.seq.units() * self.blocks.unit_bytes
            self._keep_partial(x)
            x.seq.release()
            x.seq = None
        if x in self.running:
            self.running.remove(x)
        elif x in self.waiting:
            self.waiting.remove(x)
        self.live.pop(x.rid, None)
        if not self.running:  # idle: no kept gathered K/V held
            self._kept = []
        self.finished[x.rid] = dict(x.info)
        while len(self.finished) > 4096:
            self.finished.popitem(last=False)

    def _preempt(self, x: _Live) -> None:
        log.info("preempting request %r (%d tokens): the KV budget is full", x.rid, len(x.tokens))
        x.seq.release()
        x.seq, x.done, x.keys, x.state = None, 0, [], WAITING
        self.running.remove(x)
        self.waiting.appendleft(x)
        self.counters["preemptions"] += 1

    # -- prefix keys -----------------------------------------------------------------------------------------
    def _key(self, x: _Live, j: int) -> bytes | None:
        """Content key of x's block j (slots j*bs ..), chained on block j-1's; None: not shareable."""
        parent = x.keys[j - 1] if j else b"root"
        if parent is None:
            return None
        bs = self.block_size
        s0, s1 = j * bs, (j + 1) * bs
        h = hashlib.blake2b(parent, digest_size=16)
        i = bisect.bisect_right(x.starts, s0) - 1  # the token holding slot s0
        hashes = x.req.media_hashes
        while i < len(x.tokens) and x.starts[i] < s1:
            img = x.image_of.get(i)
            if img is None:
                h.update(b"t%d;" % x.tokens[i])
            else:
                if hashes is None:
                    return None
                # the image and which of its rows lie in this block (Owl2: rows are slots; Owl3: one slot)
                a, b = max(s0, x.starts[i]) - x.starts[i], min(s1, x.starts[i + 1]) - x.starts[i]
                h.update(b"i%d:%s:%d:%d;" % (x.tokens[i], hashes[img].encode(), a, b))
            i += 1
        return h.digest()

    def _register_full(self, x: _Live) -> None:
        """Give every newly full written block its key (and register it for sharing)."""
        if not self.prefix_cache:
            return
        full = x.seq.length // self.block_size
        while len(x.keys) < full:
            j = len(x.keys)
            key = self._key(x, j)
            x.keys.append(key)
            if key is not None:
                self.blocks.register(x.seq.blocks[j], key)

    def _partial_key(self, parent: bytes | None) -> bytes | None:
        return None if parent is None else b"partial:" + parent

    def _keep_partial(self, x: _Live) -> None:
        """Keep x's last, partly filled block for a request that continues its tokens (a chat's next turn):
        only text (a block holding an image or its rows is not kept: its visual K/V would not be copied)."""
        bs = self.block_size
        full, n = divmod(x.seq.length, bs)
        if not self.prefix_cache or not n or len(x.keys) < full:
            return
        t0 = bisect.bisect_left(x.starts, full * bs)
        t1 = bisect.bisect_left(x.starts, x.seq.length)
        if x.starts[t0] != full * bs or x.starts[t1] != x.seq.length or any(i in x.image_of for i in range(t0, t1)):
            return
        key = self._partial_key(x.keys[full - 1] if full else b"root")
        if key is not None:
            self.blocks.keep_partial(x.seq.blocks[full], key, x.tokens[t0:t1])

    def _partial_match(self, x: _Live, parent: bytes | None, done: int) -> tuple[Block | None, int]:
        """The kept partly filled block continuing x's matched prefix (its tokens up to `done`) and how many of
        its slots x shares: the common tokens, text only, before x's last token (always recomputed)."""
        key = self._partial_key(parent)
        block = self.blocks.lookup(key) if key is not None else None
        if block is None:
            return None, 0
        n = 0
        while (n < len(block.tokens) and done + n < len(x.tokens) - 1 and x.tokens[done + n] == block.tokens[n]
               and done + n not in x.image_of):
            n += 1
        return (block, n) if n else (None, 0)

    # -- admission -------------------------------------------------------------------------------------------
    def _decode_reserve(self) -> int:
        """Pool blocks the running rows need at the next decode step (those starting a new block)."""
        n = sum(1 for x in self.running if x.seq is not None and x.state == DECODE
                and x.seq.length >= len(x.seq.blocks) * self.block_size)
        return n * self.blocks.num_layers

    def _chain(self, x: _Live, n: int) -> list[bytes | None]:
        """Content keys of x's first n blocks (all full), stopping after the first None (not shareable). Cached
        on x: a full block's content never changes (tokens only grow)."""
        c = x.chain
        if len(c) < n and not (c and c[-1] is None):
            saved, x.keys = x.keys, c  # _key chains on x.keys
            try:
                while len(c) < n and (not c or c[-1] is not None):
                    c.append(self._key(x, len(c)))
            finally:
                x.keys = saved
        return c[:n]

    def _follows(self, x: _Live, prefilling: list[_Live]) -> bool:
        """Whether x waits for a request being prefilled that will register blocks x could reuse and that are
        not registered yet (x's whole blocks before its last token, which is always recomputed, equal to that
        request's): once they are, x reuses them through the prefix match instead of computing the same K/V
        beside it (n > 1, a burst of requests with one system prompt or one video)."""
        bs = self.block_size
        usable = x.starts[len(x.tokens) - 1] // bs
        if not self.prefix_cache or not usable or not prefilling:
            return False
        xs = self._chain(x, usable)
        for y in prefilling:
            if len(y.keys) >= usable:
                continue
            ys = self._chain(y, y.slots() // bs)
            common = 0
            while common < min(len(xs), len(ys)) and xs[common] is not None and xs[common] == ys[common]:
                common += 1
            if common > len(y.keys):
                return True
        return False

    def _admit(self) -> None:
        # A waiting request that starts like one being prefilled waits for its blocks (re-checked every step, so
        # a leader that finishes, is preempted or aborted releases it). Others are admitted past a waiting
        # follower, in arrival order; the first that does not fit stops admission (FIFO).
        prefilling = [y for y in self.running if y.state == PREFILL]
        for x in list(self.waiting):
            if len(self.running) >= self.max_running:
                return
            if self._follows(x, prefilling):
                continue
            if not self._try_admit(x):
                return
            self.waiting.remove(x)
            self.running.append(x)
            prefilling.append(x)

    def _try_admit(self, x: _Live) -> bool:
        m, bs = self.blocks, self.block_size
        total = x.slots()
        matched, keys = [], []
        if self.prefix_cache:
            last = x.starts[len(x.tokens) - 1]  # the last token is always computed (its logits)
            for j in range(last // bs):
                x.keys = keys
                key = self._key(x, j)
                block = m.lookup(key) if key is not None else None
                if block is None:
                    break
                matched.append(block)
                keys.append(key)
            starts = set(x.starts)
            while matched and len(matched) * bs not in starts:  # Owl2: not inside an image's rows
                matched.pop()
                keys.pop()
        n_match = len(matched) * bs
        done = x.starts.index(n_match)  # tokens covered by the matched blocks
        partial, n_part = None, 0
        if self.prefix_cache:
            partial, n_part = self._partial_match(x, keys[-1] if matched else b"root", done)
        reused = [im for b in matched for im in b.images]
        n_img_done = bisect.bisect_left(x.image_tok, done)
        if not self.visual_in_text and len(reused) != n_img_done:  # cannot happen; never reuse a wrong layout
            log.warning("prefix blocks of request %r hold %d images, %d expected: not reused", x.rid, len(reused),
                        n_img_done)
            matched, keys, n_match, done, reused, n_img_done = [], [], 0, 0, [], 0
        for b in matched + ([partial] if partial else []):  # (the kept partial block too: not evicted meanwhile)
            m.acquire(b)
        new_blocks = math.ceil(total / bs) - len(matched)
        new_images = 0 if self.visual_in_text else len(x.image_tok) - n_img_done
        need = new_blocks * m.num_layers + new_images * m.image_units()
        if m.available() < need + self._decode_reserve():
            for b in matched + ([partial] if partial else []):
                m.release(b)
            x.keys = []
            return False
        seq = PagedSeq(m)
        seq.blocks = matched + [m.new_block() for _ in range(new_blocks)]
        seq.images = list(reused)
        seq.reserved = [m.new_image() for _ in range(new_images)]
        if partial is not None:  # its common slots copied into x's own next block (text only: slot = token)
            m.copy_slots(partial, seq.blocks[len(matched)], n_part)
            m.release(partial)
            n_match, done = n_match + n_part, done + n_part
        seq.length = seq.next_pos = n_match  # a solo sequence has no padding: position = slot
        x.seq, x.done, x.keys, x.state = seq, done, keys, PREFILL
        x.admitted = next(self._order)
        self.counters["cached_tokens"] += n_match
        self.counters["prompt_slots"] += total
        if x.first_admission:
            x.first_admission = False
            x.info.update(cached_tokens=min(done, len(x.prompt)), cached_images=n_img_done)
        return True

    # -- forwards --------------------------------------------------------------------------------------------
    def _prefill(self, events: list[StepEvent]) -> None:
        """This step's prompt chunks: at most `prefill_chunk` slots in admission order (each request at least
        one token), run as one or a few batched forwards (`_prefill_groups`)."""
        budget = self.prefill_chunk
        chunks = []
        for x in [x for x in self.running if x.state == PREFILL]:
            if budget <= 0:
                break
            a = b = x.done
            while b < len(x.tokens) and (b == a or x.starts[b + 1] - x.starts[a] <= budget):
                b += 1
            budget -= x.starts[b] - x.starts[a]
            chunks.append((x, a, b))
        for group in self._prefill_groups(chunks):
            self._prefill_forward(group, events)

    def _prefill_groups(self, chunks: list[tuple[_Live, int, int]]) -> list[list[tuple[_Live, int, int]]]:
        """The chunks split into forwards. One forward over several requests' chunks left-pads them to the
        longest (the padding's tokens go through every layer) and pads each row's gathered past (text slots,
        and for Owl3 the images already written) to the largest; a separate forward costs a pass over the
        weights and the per-forward overhead instead. Rows sorted by size and split where that is cheaper
        (token-equivalents: `PREFILL_FORWARD_TOKENS` a forward, 1 a padded query slot, 1 / `PREFILL_KEY_DIV` a
        padded past slot of a row), and where one layer's gathered past would pass `gather_bytes`."""
        if len(chunks) <= 1:
            return [chunks] if chunks else []
        t = self.blocks.image_tokens or 0
        bs = self.block_size
        slot_bytes = self.blocks.unit_bytes // bs
        new = {id(x): x.starts[b] - x.starts[a] for x, a, b in chunks}
        past = {id(x): math.ceil(x.seq.length / bs) * bs + len(x.seq.images) * t for x, _, _ in chunks}
        chunks = sorted(chunks, key=lambda c: (new[id(c[0])], past[id(c[0])]))
        n = len(chunks)
        forward = PREFILL_FORWARD_TOKENS.get(self.model.device.type, 4096)
        best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
        for j in range(1, n + 1):
            mq = mp = 0
            for i in range(j - 1, -1, -1):  # group chunks[i:j]
                x = chunks[i][0]
                mq, mp = max(mq, new[id(x)]), max(mp, past[id(x)])
                g = j - i
                if g > 1 and g * (mp + mq) * slot_bytes > self.gather_bytes:
                    break
                cost = best[i] + forward + g * (mq + mp / PREFILL_KEY_DIV)
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        groups, j = [], n
        while j:
            groups.append(chunks[cut[j] : j])
            j = cut[j]
        return groups[::-1]

    def _prefill_forward(self, group: list[tuple[_Live, int, int]], events: list[StepEvent]) -> None:
        """One forward over these requests' chunks [a, b): left-padded to the longest (the model masks the
        padding, PagedView writes only real slots), each chunk's images placed at their placeholders (packed
        in row order; rows may carry different numbers) and appended to the request's visual K/V. Requests
        whose prompt is done sample their first token from their row's last logits."""
        dev = self.model.device
        width = max(b - a for _, a, b in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        feats, places, spans = [], [], []
        for r, (x, a, b) in enumerate(group):
            pad = width - (b - a)
            ids[r, pad:] = torch.tensor(x.tokens[a:b])
            mask[r, pad:] = 1
            j0, j1 = bisect.bisect_left(x.image_tok, a), bisect.bisect_left(x.image_tok, b)
            spans.append((j0, j1, len(x.seq.images)))
            places.append([p - a + pad for p in x.image_tok[j0:j1]])
            if j1 > j0:
                feats.append(x.req.image_embeds[j0:j1])
                if not self.visual_in_text:
                    x.seq.pending, x.seq.reserved = x.seq.reserved[: j1 - j0], x.seq.reserved[j1 - j0 :]
        kw = {}
        if feats:
            pos = torch.full((len(group), max(len(p) for p in places)), -1, dtype=torch.long)
            for r, p in enumerate(places):
                pos[r, : len(p)] = torch.tensor(p, dtype=torch.long)
            kw = dict(image_embeds=torch.cat(feats).to(dev), image_positions=pos.to(dev))
        if bool((mask == 0).any()):  # rows of one length need no mask (the single-request forward as before)
            kw["attention_mask"] = mask.to(dev)
        out = self.model(ids.to(dev), cache=PagedView(self.blocks, [x.seq for x, _, _ in group]),
                         last_logits_only=True, **kw)
        self.counters["prefill_forwards"] += 1
        self.counters["prefill_rows"] += len(group)
        done = []
        for r, ((x, a, b), (j0, j1, n_before)) in enumerate(zip(group, spans)):
            for im, p in zip(x.seq.images[n_before:], x.image_tok[j0:j1]):  # each image lives with its placeholder
                x.seq.blocks[x.starts[p] // self.block_size].images.append(im)
            x.done = b
            self.counters["prefill_tokens"] += x.starts[b] - x.starts[a]
            self._register_full(x)
            if b == len(x.tokens):
                x.state = DECODE
                done.append(r)
        if done:
            logits = out.logits[:, -1].float()
            self._sample([group[r][0] for r in done], logits if len(done) == len(group) else logits[done], events)

    def _decode(self, events: list[StepEvent]) -> None:
        rows = [x for x in self.running if x.state == DECODE]
        m, bs = self.blocks, self.block_size
        for x in list(rows):  # room for one more slot each, oldest first; the newest are preempted
            if x not in self.running:
                continue
            if x.seq.length < len(x.seq.blocks) * bs:
                continue
            while m.available() < m.num_layers:
                victim = self.running[-1]
                self._preempt(victim)
                if victim in rows:
                    rows.remove(victim)
                if victim is x:
                    break
            if x in self.running:
                x.seq.blocks.append(m.new_block())
        dev = self.model.device
        groups = self._decode_groups(rows)
        keeps = self._keeps(groups)
        for group, keep in zip(groups, keeps):
            ids = torch.tensor([[x.tokens[-1]] for x in group], device=dev)
            view = PagedView(m, [x.seq for x in group], keep=keep)
            logits = self.model(ids, cache=view).logits[:, -1].float()
            for x in group:
                x.done += 1
                self._register_full(x)
            self._sample(group, logits, events)

    def _keeps(self, groups: list[list[_Live]]) -> list[KeptKV | None]:
        """Each decode group's kept gathered K/V (paged_cache.KeptKV): last step's copy that holds some of the
        group's rows, changed in place (rows that left removed, rows that joined added when they fit its
        layout; the group is put in the copy's row order), when that moves fewer rows than the group has; a new
        one otherwise (built by this step's gather); None past `keep_bytes` (that group gathers every step).
        A copy serves one group; copies no group uses are dropped: a row that joined, was preempted or changed
        never reads a stale copy."""
        old, self._kept = self._kept, []
        out, left = [], self.keep_bytes
        for group in groups:
            seqs = [x.seq for x in group]
            grow = min(KEEP_GROW, max(x.params.max_new_tokens - len(x.generated) for x in group))
            keep = None
            for k, st in enumerate(old):
                rows = st.rows_of(seqs) or []
                known = {r for r in rows if r is not None}
                if not known:
                    continue
                gone = [r for r in range(len(st.seqs)) if r not in known]  # left, moved to another group, stale
                new = [s for s, r in zip(seqs, rows) if r is None]
                if len(gone) + len(new) >= len(group) or st.nbytes_next() > left:
                    continue  # a new copy costs less (or this one is past the budget)
                old.pop(k)  # changed in place: no other group may take it
                st.remove(gone)
                if new and not st.fits(new):
                    break  # rows that do not fit its layout: a new copy
                st.add(new)
                place = {id(s): r for r, s in enumerate(st.seqs)}
                group.sort(key=lambda x: place[id(x.seq)])  # the copy's row order: a reordered group costs no copy
                keep = st
                break
            if keep is None and KeptKV.estimate(self.blocks, seqs, grow) <= left:
                keep = KeptKV(self.blocks, seqs, grow)
            if keep is not None and keep.ready and keep.nbytes_next() > left:
                keep = None
            if keep is not None:
                left -= keep.nbytes_next() if keep.ready else KeptKV.estimate(self.blocks, seqs, grow)
                self._kept.append(keep)
            out.append(keep)
        return out

    def _decode_groups(self, rows: list[_Live]) -> list[list[_Live]]:
        """The decode rows split into forwards. A forward over rows pads each row's gathered K/V to the group's
        longest text and largest image count (paged_cache.PagedView), so a 32-frame video row beside text rows
        makes every row copy 32 images' worth of (zero) visual K/V per hyper layer; a separate forward costs a
        pass over the weights instead. Rows sorted by size, split where that is cheaper (bytes moved: the
        attention reads the padded K/V, and the gather reads and writes them unless the group's copy is kept
        across steps; a forward reads the weights plus `FORWARD_OVERHEAD_BYTES`),
        and always where one layer's gathered copy would pass `gather_bytes` (transient memory)."""
        if len(rows) <= 1:
            return [rows] if rows else []
        t = self.blocks.image_tokens or 0
        bs, m = self.block_size, self.blocks
        slot_bytes = m.unit_bytes // bs  # one slot of one layer, K and V
        text = {id(x): math.ceil(x.seq.length / bs) * bs for x in rows}
        vis = {id(x): len(x.seq.images) * t for x in rows}
        rows = sorted(rows, key=lambda x: (vis[id(x)], text[id(x)]))
        n = len(rows)
        forward = self._weight_bytes + FORWARD_OVERHEAD_BYTES.get(self.model.device.type, 8 << 30)
        # bytes moved per padded slot and step: the attention reads it, and without kept copies (keep_bytes 0)
        # the gather also reads and writes it every step
        per_slot = 1 if self.keep_bytes > 0 else 3
        best = [0.0] + [math.inf] * n  # best[j]: cost of rows[:j]; cut[j]: where its last group starts
        cut = [0] * (n + 1)
        # plain lists and locals: this runs every step over up to max_running rows (O(n^2) iterations)
        tl, vl = [text[id(x)] for x in rows], [vis[id(x)] for x in rows]
        n_text, n_vis, bound = m.num_layers * slot_bytes * per_slot, len(m.visual_layers) * slot_bytes * per_slot, \
            self.gather_bytes
        for j in range(1, n + 1):
            mv, mt = vl[j - 1], 0  # rows are sorted by visual size first: rows[j - 1] has the most
            bj, cj = math.inf, 0
            for i in range(j - 1, -1, -1):  # group rows[i:j]
                if tl[i] > mt:
                    mt = tl[i]
                g = j - i
                if g > 1 and g * (mt if mt > mv else mv) * slot_bytes > bound:
                    break
                cost = best[i] + forward + g * (mt * n_text + mv * n_vis)
                if cost < bj:
                    bj, cj = cost, i
            best[j], cut[j] = bj, cj
        groups, j = [], n
        while j:
            groups.append(rows[cut[j] : j])
            j = cut[j]
        return groups[::-1]

    def _sample(self, rows: list[_Live], logits: Tensor, events: list[StepEvent]) -> None:
        """Engine.stream's sampling for these rows (logits [B, V]); events out, finished rows leave."""
        raw = logits.clone() if self.keep_logits else None
        dev = logits.device
        seen = penalty = None
        if any(x.seen is not None for x in rows):
            seen = torch.stack([x.seen if x.seen is not None else torch.zeros(self.vocab, dtype=torch.bool, device=dev)
                                for x in rows])
            penalty = torch.tensor([x.params.repetition_penalty for x in rows], device=dev)
        _, tokens, lps = next_tokens(logits, [x.params for x in rows], [x.gen for x in rows],
                                     [x.req.constraint for x in rows], [len(x.generated) for x in rows], seen, penalty)
        for r, (x, t) in enumerate(zip(rows, tokens)):
            x.append(t)
            if x.seen is not None and 0 <= t < self.vocab:
                x.seen[t] = True
            finish = None
            if t in x.params.stop_token_ids:
                finish = "stop"
            elif len(x.generated) >= x.params.max_new_tokens:
                finish = "length"
            events.append(StepEvent(x.rid, t, finish, raw[r] if raw is not None else None, lps[r]))
            if finish is not None:
                self._leave(x)
