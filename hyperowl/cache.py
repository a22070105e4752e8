"""The explicit decode cache: text K/V per layer, visual K/V per hyper layer written once at prefill.

Design note: one buffer per decoder layer, [B, kv_heads, Nv + capacity, head_dim]. A hyper layer's buffer
starts with its visual keys/values (after the shared LayerNorm, `v_kv_proj` and MI-Rope), written once at
prefill; text K/V follow from slot Nv on. So a decode step never re-projects or copies the visual
features: the 240728 cross-attention reads the view [:Nv], the 241101 fused attention reads the contiguous
view [:Nv + length]. Non-hyper layers have Nv = 0. All rows share one text length (prompts are
left-padded); `key_valid` marks padding slots, `next_pos` holds each row's next RoPE position, and
`image_pos` the position from which each image is visible (also its MI-Rope position).
The cache holds no module state and can be kept by a caller (the engine) across calls.

Appending (live video, hyperowl/live.py): images may also arrive after text. A hyper layer's front region
then has room for `vcap[i] >= nv[i]` visual slots (text starts at vcap[i]); `alloc_visual` on a non-empty
cache appends the new images' slots after the old ones, regrowing the front region by a quarter at a time
(amortised: a long stream is not copied once per frame). Old visual K/V are never recomputed: MI-Rope gives
each image its own position, so an image's keys do not depend on what comes after it. The fused view
[visual ; text] then has spare (zeroed) slots in between, which the 241101 attention masks out.
`truncate` rolls text back (re-tokenized answer text), `evict` drops images' visual K/V and text slots (the
memory policy): the kept slots are moved, never recomputed.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0  # text slots filled (same for every row)
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.nv: list[int] = [0] * num_layers  # visual slots filled at the front of each layer's buffer
        self.vcap: list[int] = [0] * num_layers  # visual slots reserved at the front (text starts here)
        self.key_valid: Tensor | None = None  # [B, capacity] bool
        self.next_pos: Tensor | None = None  # [B] long
        self.image_pos: Tensor | None = None  # [B, N_max] long, visible-from position, huge = padding
        self.growth = 2.0  # text capacity factor when full (a live session with a memory ceiling uses less)
        self.visual_writes = 0  # how many times visual K/V were computed into this cache (tests check 1/layer)

    @property
    def has_visual(self) -> bool:
        return self.image_pos is not None

    # -- bookkeeping done once per forward by the model -------------------------------------------------
    def begin(self, new_valid: Tensor) -> None:
        """Record the validity mask of the Lq tokens about to be written; grows the buffers if needed."""
        b, lq = new_valid.shape
        if self.key_valid is None:
            self.capacity = max(self.capacity, lq)
            self.key_valid = torch.zeros(b, self.capacity, dtype=torch.bool, device=new_valid.device)
            self.next_pos = torch.zeros(b, dtype=torch.long, device=new_valid.device)
        if self.length + lq > self.capacity:
            self._grow(max(self.length + lq, int(self.growth * self.capacity)))
        self.key_valid[:, self.length : self.length + lq] = new_valid.bool()

    def commit(self, lq: int, last_pos: Tensor) -> None:
        self.length += lq
        self.next_pos = last_pos + 1

    def append_images(self, new_pos: Tensor, ragged: bool) -> Tensor:
        """image_pos [B, N_old + N_new] after appending images at positions new_pos [B, N_new] (the model then
        sets `image_pos` to it). Rows share one layout here, so every row must append as many images
        (`ragged`: they do not); paged_cache.PagedView joins rows of different counts."""
        if ragged:
            raise ValueError("appending images to a cache needs the same number of new images in every row")
        return new_pos if self.image_pos is None else torch.cat([self.image_pos, new_pos], 1)

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:-2], extra, t.shape[-1])], dim=-2)
        self.k = [None if t is None else pad(t) for t in self.k]
        self.v = [None if t is None else pad(t) for t in self.v]
        self.key_valid = torch.cat([self.key_valid, self.key_valid.new_zeros(self.key_valid.shape[0], extra)], 1)
        self.capacity = capacity

    # -- per-layer writes and reads ----------------------------------------------------------------------
    def _alloc(self, i: int, like: Tensor, nv: int) -> None:
        b, h, _, d = like.shape
        shape = (b, h, nv + self.capacity, d)
        # empty, not zeros: every slot is written before it is read (reads stop at the filled length), and
        # zero-filling a long video's visual K/V is a measurable share of TTFT
        self.k[i] = like.new_empty(shape)
        self.v[i] = like.new_empty(shape)
        self.nv[i] = self.vcap[i] = nv

    def alloc_visual(self, i: int, shape: tuple[int, int, int, int], dtype: torch.dtype,
                     device: torch.device) -> tuple[Tensor, Tensor]:
        """Room for shape[2] new visual slots in layer i: the whole front region of an empty cache (prefill),
        or slots after the images already there (appending). Returns the new slots' views [B, Hkv, n, D] for
        the caller to fill, once."""
        b, h, n, d = shape
        self.visual_writes += 1
        if self.k[i] is None:
            if self.length:
                raise RuntimeError(f"layer {i} has text but no buffer")
            self._alloc(i, torch.empty(b, h, 0, d, dtype=dtype, device=device), n)
            return self.visual(i)
        nv = self.nv[i]
        if nv + n > self.vcap[i]:
            self._regrow_visual(i, max(nv + n, self.vcap[i] + self.vcap[i] // 4))
        self.nv[i] = nv + n
        return self.k[i][:, :, nv : nv + n], self.v[i][:, :, nv : nv + n]

    def _regrow_visual(self, i: int, vcap: int) -> None:
        """Layer i's buffer with `vcap` visual slots in front: filled visual slots and text copied over."""
        nv, old, used = self.nv[i], self.vcap[i], self.length
        for buf in (self.k, self.v):
            t = buf[i]
            new = t.new_empty(*t.shape[:-2], vcap + self.capacity, t.shape[-1])
            new[:, :, :nv] = t[:, :, :nv]
            new[:, :, nv:vcap] = 0  # spare slots: finite, as they are read (masked) by the fused attention
            new[:, :, vcap : vcap + used] = t[:, :, old : old + used]
            buf[i] = new
        self.vcap[i] = vcap

    def visual(self, i: int) -> tuple[Tensor, Tensor]:
        nv = self.nv[i]
        return self.k[i][:, :, :nv], self.v[i][:, :, :nv]

    def write_text(self, i: int, k: Tensor, v: Tensor) -> None:
        if self.k[i] is None:
            self._alloc(i, k, 0)
        s = self.vcap[i] + self.length
        self.k[i][:, :, s : s + k.shape[2]] = k
        self.v[i][:, :, s : s + k.shape[2]] = v

    def text(self, i: int, lq: int) -> tuple[Tensor, Tensor]:
        """Text K/V of all filled slots including the lq just written."""
        s, e = self.vcap[i], self.vcap[i] + self.length + lq
        return self.k[i][:, :, s:e], self.v[i][:, :, s:e]

    def visual_and_text(self, i: int, lq: int) -> tuple[Tensor, Tensor, int]:
        """[visual ; gap ; text] K/V as one contiguous view (the 241101 fused attention's keys) and the gap: the
        spare visual slots (zeros) between the images and the text, which the caller masks out. Non-zero only
        after appending; masking them costs less than closing the gap (a copy of the buffer) each time."""
        e = self.vcap[i] + self.length + lq
        return self.k[i][:, :, :e], self.v[i][:, :, :e], self.vcap[i] - self.nv[i]

    # -- live sessions: roll text back, evict images -----------------------------------------------------
    def truncate(self, length: int) -> None:
        """Forget the text slots from `length` on (they are rewritten by the next forward). The caller makes
        sure no image's placeholder is among them."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate({length}): the cache holds {self.length} text slots")
        self.next_pos = self.next_pos - self.key_valid[:, length : self.length].sum(1)
        self.key_valid[:, length:] = False
        self.length = length

    def drop_images(self, keep: Tensor) -> None:
        """Keep only the images at indices `keep` (ascending) of every row: their visual K/V are moved together
        (no recomputation) and the others' freed; text slots are untouched."""
        self.evict(keep, None)

    def evict(self, keep_images: Tensor | None, keep_text: Tensor | None) -> None:
        """Keep only the images at indices `keep_images` and the text slots at `keep_text` (both ascending;
        None: all). What is kept is moved into new, smaller buffers, never recomputed. Text positions stay
        those the slots were written at (RoPE is in the keys; `next_pos` is unchanged), so a later query reads
        the kept slots exactly as before, as if the evicted ones were padding (tested against that)."""
        if keep_images is not None:
            keep_images = keep_images.to(self.image_pos.device)
            n = self.image_pos.shape[1]
            self.image_pos = self.image_pos[:, keep_images]
        text = None
        if keep_text is not None:
            text = keep_text.to(self.key_valid.device)
            kv = self.key_valid.new_zeros(self.key_valid.shape)
            kv[:, : len(text)] = self.key_valid[:, text]
            self.key_valid = kv
        for i in range(len(self.k)):
            nv = self.nv[i]
            if self.k[i] is None or (not nv or keep_images is None) and text is None:
                continue
            dev = self.k[i].device
            if nv and keep_images is not None:
                t = nv // n  # tokens per image
                slots = (keep_images[:, None] * t + torch.arange(t, device=keep_images.device)).flatten().to(dev)
            else:
                slots = torch.arange(nv, device=dev)
            kept, start = len(slots), self.vcap[i]
            rows = (torch.arange(self.length, device=dev) if text is None else text.to(dev)) + start
            for buf in (self.k, self.v):  # a new, smaller buffer: the evicted slots' memory is freed
                old = buf[i]
                new = old.new_empty(*old.shape[:-2], kept + self.capacity, old.shape[-1])
                new[:, :, :kept] = old[:, :, slots]
                new[:, :, kept : kept + len(rows)] = old[:, :, rows]
                buf[i] = new
            self.nv[i] = self.vcap[i] = kept
        if text is not None:
            self.length = len(text)

    def visual_bytes(self) -> int:
        """Bytes of the visual regions (filled and spare slots) of all layers."""
        out = 0
        for t, vcap in zip(self.k, self.vcap):
            if t is not None and vcap:
                out += 2 * t[:, :, :vcap].numel() * t.element_size()
        return out

    def nbytes(self) -> int:
        """Bytes held by the K/V buffers."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def reorder(self, rows: Tensor) -> None:
        """Keep only `rows` of the batch (e.g. drop finished requests)."""
        self.k = [None if t is None else t[rows] for t in self.k]
        self.v = [None if t is None else t[rows] for t in self.v]
        for name in ("key_valid", "next_pos", "image_pos"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[rows])
